"""Render a campaign once per language: Jinja2 fills MJML, mjml-python compiles, premailer inlines.

This is the only module that imports mjml (two distributions install a top-level ``mjml``; we pin
mjml-python) and premailer. Per-recipient data never reaches the templates: the output carries the
UNSUBSCRIBE_URL and PREFERENCES_URL markers, and personalise() swaps them in at send time.
"""

from __future__ import annotations

import dataclasses
import functools
import gettext
import html
import io
import logging
import re
import textwrap
from collections.abc import Iterable
from datetime import date, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jinja2
import premailer
from babel import Locale
from babel.dates import format_date
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from mjml import mjml2html

from newsletter.config import LANGUAGES, Settings
from newsletter.errors import RenderError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
LOCALE_DIR = TEMPLATES_DIR / "locale"
DOMAIN = "newsletter"

UNSUBSCRIBE_URL = "%%UNSUBSCRIBE_URL%%"
PREFERENCES_URL = "%%PREFERENCES_URL%%"

KINDS = ("digest", "alert")
SUBJECT_MAX_CHARS = 150
TEXT_WIDTH = 72

# premailer keeps the doctype only when it is spelled as lxml spells it ("<!DOCTYPE html>").
_DOCTYPE = re.compile(r"^\s*<!doctype html>", re.IGNORECASE)
_BLANK_LINES = re.compile(r"\n{3,}")
# HTML collapses ASCII whitespace only: no-break spaces in summaries are kept on purpose.
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


@dataclasses.dataclass(frozen=True)
class ItemView:
    title: str
    link: str
    summary_html: str
    published_at: datetime
    categories: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CampaignView:
    kind: str  # "digest" | "alert"
    list_name: str
    items: tuple[ItemView, ...]
    # An alert written by staff, with no portal item behind it:
    title: str = ""
    body_html: str = ""
    url: str = ""
    # The day the campaign is issued; without it, the newest item's day.
    issued_at: datetime | None = None


@dataclasses.dataclass(frozen=True)
class RenderedVariant:
    lang: str
    subject: str
    html: str
    text: str


@dataclasses.dataclass(frozen=True)
class _Lead:
    """What an alert is about: a portal item or the text staff wrote."""

    title: str
    body_html: str
    url: str
    published_at: datetime | None


@dataclasses.dataclass(frozen=True)
class _Group:
    name: str
    items: tuple[ItemView, ...]


def render_variant(view: CampaignView, *, lang: str, settings: Settings) -> RenderedVariant:
    """Render the subject, HTML and text of one campaign in one language, with URL markers."""
    context = _context(view, lang=lang, settings=settings)
    source = _render_template(f"email/{view.kind}.mjml.j2", lang, context)
    page = inline_css(compile_mjml(source))
    text = _tidy_text(_render_template(f"text/{view.kind}.txt.j2", lang, context))
    return RenderedVariant(lang=lang, subject=context["subject"], html=page, text=text)


def render_mjml_source(view: CampaignView, *, lang: str, settings: Settings) -> str:
    """Fill the campaign's MJML template, before compilation (for previews and benchmarks)."""
    context = _context(view, lang=lang, settings=settings)
    return _render_template(f"email/{view.kind}.mjml.j2", lang, context)


def compile_mjml(source: str) -> str:
    """Turn MJML into HTML, with no web fonts and no includes; bad MJML raises RenderError."""
    try:
        # fonts={}: the default links Google Fonts, which tracks readers and needs the network.
        page = mjml2html(source, fonts={}, disable_comments=True, include_loader=_refuse_include)
    except ValueError as e:
        raise RenderError(f"the MJML template is not valid: {e}") from e
    return page


def inline_css(page: str) -> str:
    """Inline the <style> rules into style attributes, never fetching anything."""
    inliner = premailer.Premailer(
        allow_network=False,
        allow_loading_external_files=False,
        disable_validation=True,
        cssutils_logging_level=logging.CRITICAL,
        # MJML's responsive media queries need !important to beat the inlined widths.
        strip_important=False,
    )
    match = _DOCTYPE.match(page)
    if match:
        page = "<!DOCTYPE html>" + page[match.end() :]
    try:
        return str(inliner.transform(page))
    except Exception as e:  # premailer raises bare lxml and cssutils errors
        raise RenderError(f"could not inline the CSS of the rendered email: {e}") from e


def personalise(
    variant: RenderedVariant, *, unsubscribe_url: str, preferences_url: str
) -> tuple[str, str]:
    """Put one recipient's links into a rendered variant; returns (html, text)."""
    page = _replace_markers(
        variant.html, html.escape(unsubscribe_url), html.escape(preferences_url)
    )
    text = _replace_markers(variant.text, unsubscribe_url, preferences_url)
    return page, text


def _replace_markers(body: str, unsubscribe_url: str, preferences_url: str) -> str:
    return body.replace(UNSUBSCRIBE_URL, unsubscribe_url).replace(PREFERENCES_URL, preferences_url)


def _refuse_include(path: str) -> str:
    # mj-include could read files from the server; our templates include with Jinja2 instead.
    raise ValueError(f"mj-include is not allowed ({path})")


# --- context ---------------------------------------------------------------------------------


def _context(view: CampaignView, *, lang: str, settings: Settings) -> dict[str, Any]:
    """Everything the templates of one campaign and language need."""
    _check_view(view, lang)
    view = _without_markers(view)
    lead = _lead(view) if view.kind == "alert" else None
    issue_date = view.issued_at or max((i.published_at for i in view.items), default=None)
    return {
        "lang": lang,
        "dir": Locale.parse(lang).text_direction,
        "brand": settings.brand,
        "view": view,
        "groups": _group_by_category(view.items),
        "lead": lead,
        "issue_date": issue_date,
        "subject": _subject(view, lead, lang=lang, brand=settings.brand.name, on=issue_date),
        "unsubscribe_url": UNSUBSCRIBE_URL,
        "preferences_url": PREFERENCES_URL,
    }


def _check_view(view: CampaignView, lang: str) -> None:
    if view.kind not in KINDS:
        raise RenderError(f"unknown campaign kind {view.kind!r}: expected one of {KINDS}")
    if lang not in LANGUAGES:
        raise RenderError(f"no translations for language {lang!r}: expected one of {LANGUAGES}")
    if view.kind == "digest" and not view.items:
        raise RenderError("a digest needs at least one item")
    if view.kind == "alert" and not (view.items or view.title):
        raise RenderError("an alert needs an item or a title")


def _without_markers(view: CampaignView) -> CampaignView:
    """Drop marker strings from feed and staff text, so only our links get the recipient's URLs."""
    # Otherwise a feed could send a reader's signed unsubscribe token to a link of its choosing.
    items = tuple(
        ItemView(
            title=_unmark(item.title),
            link=_unmark(item.link),
            summary_html=_unmark(item.summary_html),
            published_at=item.published_at,
            categories=tuple(_unmark(name) for name in item.categories),
        )
        for item in view.items
    )
    return dataclasses.replace(
        view,
        list_name=_unmark(view.list_name),
        items=items,
        title=_unmark(view.title),
        body_html=_unmark(view.body_html),
        url=_unmark(view.url),
    )


def _unmark(value: str) -> str:
    return value.replace(UNSUBSCRIBE_URL, "").replace(PREFERENCES_URL, "")


def _lead(view: CampaignView) -> _Lead:
    if view.items:
        item = view.items[0]
        return _Lead(item.title, item.summary_html, item.link, item.published_at)
    return _Lead(view.title, view.body_html, view.url, None)


def _group_by_category(items: Iterable[ItemView]) -> tuple[_Group, ...]:
    """Group items by their first category, groups in order of first appearance."""
    groups: dict[str, list[ItemView]] = {}
    for item in items:
        groups.setdefault(item.categories[0] if item.categories else "", []).append(item)
    return tuple(_Group(name, tuple(members)) for name, members in groups.items())


def _subject(
    view: CampaignView, lead: _Lead | None, *, lang: str, brand: str, on: datetime | None
) -> str:
    """One line, under SUBJECT_MAX_CHARS, in the reader's language."""
    _ = _translations(lang).gettext
    if lead is None:
        day = _format_day(on, lang) if on else ""
        subject = _("%(brand)s: weekly digest, %(date)s") % {"brand": brand, "date": day}
    else:
        subject = _("Urgent action: %(title)s") % {"title": _one_line(lead.title)}
    return _truncate(_one_line(subject), SUBJECT_MAX_CHARS - 1)


def _one_line(value: str) -> str:
    # split() with no argument also drops CR, LF, tabs and Unicode line separators.
    return " ".join(value.split())


def _truncate(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    cut = value[: limit - 1]
    if " " in cut[limit // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.:;-") + "…"


def _format_day(value: date, lang: str) -> str:
    return str(format_date(value, format="long", locale=lang))


# --- Jinja2 and gettext ----------------------------------------------------------------------


def _render_template(name: str, lang: str, context: dict[str, Any]) -> str:
    try:
        return _environment(lang).get_template(name).render(context)
    except jinja2.TemplateError as e:
        raise RenderError(f"template {name} ({lang}) failed: {e}") from e


@functools.cache
def _environment(lang: str) -> jinja2.Environment:
    """One Jinja2 environment per language and process, with that language's catalogue."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=_is_html_template,
        undefined=jinja2.StrictUndefined,
        extensions=["jinja2.ext.i18n"],
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.install_gettext_translations(_translations(lang), newstyle=True)  # type: ignore[attr-defined]
    env.filters["day"] = functools.partial(_format_day, lang=lang)
    env.filters["to_text"] = html_to_text
    env.filters["wrap"] = wrap_text
    return env


def _is_html_template(name: str | None) -> bool:
    return name is None or not name.endswith(".txt.j2")


@functools.cache
def _translations(lang: str) -> gettext.NullTranslations:
    """Compile the language's .po catalogue in memory; English is the source language."""
    po_path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"
    if lang == "en" or not po_path.is_file():
        return gettext.NullTranslations()
    with po_path.open("rb") as po_file:
        catalog = read_po(po_file, locale=lang, domain=DOMAIN)
    buffer = io.BytesIO()
    write_mo(buffer, catalog)
    buffer.seek(0)
    return gettext.GNUTranslations(buffer)


# --- plain text ------------------------------------------------------------------------------

_PARAGRAPH = "\x00"
_BLOCK_TAGS = frozenset(
    {"p", "div", "ul", "ol", "li", "blockquote", "pre", "table", "tr", "hr"}
    | {f"h{level}" for level in range(1, 7)}
)


class _TextExtractor(HTMLParser):
    """Collects the text of sanitised HTML, marking paragraph breaks and writing out links."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._links: list[tuple[str, int]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_PARAGRAPH)
        if tag == "li":
            self.parts.append("- ")
        elif tag == "br":
            self.parts.append("\n")
        elif tag == "a":
            self._links.append((dict(attrs).get("href") or "", len(self.parts)))

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append(_PARAGRAPH)
        elif tag == "a" and self._links:
            href, start = self._links.pop()
            label = "".join(self.parts[start:]).strip()
            if href and href != label:
                self.parts.append(f" ({href})")

    def handle_data(self, data: str) -> None:
        self.parts.append(_HTML_SPACE.sub(" ", data))


def html_to_text(fragment: str) -> str:
    """Sanitised HTML to plain paragraphs: tags dropped, entities decoded, links written out."""
    extractor = _TextExtractor()
    extractor.feed(fragment)
    extractor.close()
    paragraphs = []
    for block in "".join(extractor.parts).split(_PARAGRAPH):
        lines = (line.strip(" ") for line in block.split("\n"))
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def wrap_text(value: str, width: int = TEXT_WIDTH) -> str:
    """Wrap each line of plain text at `width` columns, never breaking a URL or a word."""
    wrapped = []
    for line in value.split("\n"):
        indent = "  " if line.startswith("- ") else ""
        filled = textwrap.fill(
            line,
            width=width,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )
        wrapped.append(filled)
    return "\n".join(wrapped)


def _tidy_text(text: str) -> str:
    lines = (line.rstrip() for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip() + "\n"
