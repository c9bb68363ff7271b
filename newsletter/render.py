"""Render a campaign once per language: Jinja2 fills MJML, mjml-python compiles, premailer inlines.

This is the only module that imports mjml (two distributions install a top-level ``mjml``; we pin
mjml-python) and premailer. Per-recipient data never reaches the templates: where they put a
reader's links, the output carries markers (link_markers), and personalise() puts the links in.
The templates and catalogues are set up in i18n.py, the HTML-to-text filters live in htmltext.py.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime
from typing import Any

import jinja2
from babel import Locale
from babel.dates import format_date
from mjml import mjml2html

from newsletter.case_view import CaseView, short_mailto_links
from newsletter.config import LANGUAGES, BrandSettings, Settings
from newsletter.errors import RenderError
from newsletter.htmltext import html_to_text, shorten_html, tidy_text, wrap_text
from newsletter.i18n import CAMPAIGN_DOMAIN, gettext_for, make_environment
from newsletter.i18n import LOCALE_DIR as LOCALE_DIR  # re-exported: imported from here before i18n
from newsletter.i18n import TEMPLATES_DIR as TEMPLATES_DIR
from newsletter.sanitize import MAX_HTML_DEPTH, html_depth

# The markers of variants stored before variants.link_nonce (0003): one fixed pair, which feed text
# could smuggle in. Such variants are still sent, but only when each marker stands once, in its own
# place (misplaced_links); every variant rendered now carries markers with a nonce instead.
UNSUBSCRIBE_URL = "%%UNSUBSCRIBE_URL%%"
PREFERENCES_URL = "%%PREFERENCES_URL%%"
# The personal links, in the order the templates put them (each once in each part, in the footer).
PERSONAL_LINKS = ("unsubscribe", "preferences")
# A personal link only some variants carry (once in each part, or not at all): a case's first
# message carries the reader's "I sent my letter" link, inside its own section (wrote_section).
OPTIONAL_LINKS = ("wrote",)

KINDS = ("digest", "alert")
SUBJECT_MAX_CHARS = 150
# Room left under the HTML limit for the recipient's signed links, which replace the markers.
PERSONALISATION_MARGIN_BYTES = 2048
# Fractions of [render] summary_max_chars tried, in turn, when a digest is too big; 0 = titles.
SHORTER_SUMMARIES = (0.5, 0.25, 0.0)


def N_(message: str) -> str:
    """Mark a message for extraction; it is translated where it is used."""
    return message


_PUBLISHED_IN = {"en": N_("in English"), "be": N_("in Belarusian"), "ru": N_("in Russian")}

# premailer keeps the doctype only when it is spelled as lxml spells it ("<!DOCTYPE html>").
# Linear: anchored at the start (re tries position 0 only), then one class and a literal; and it
# runs on mjml's output, not on outside text.
_DOCTYPE = re.compile(r"^\s*<!doctype html>", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ItemView:
    title: str
    link: str
    summary_html: str
    published_at: datetime
    categories: tuple[str, ...]
    # The language the item was published in; "" = unknown (taken as the reader's).
    lang: str = ""


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
    # The language staff wrote title and body_html in, when it is not the reader's (a missing
    # translation falls back to the default language's text, marked as digests mark items).
    text_lang: str = ""
    # The campaign's name in its web copy's URL (/archive/<slug>/<lang>); "" = no web copy.
    slug: str = ""
    # A message of an urgent-action case (case_view.py): rendered by the action templates.
    case: CaseView | None = None


@dataclasses.dataclass(frozen=True)
class RenderedVariant:
    lang: str
    subject: str
    html: str
    text: str
    # The random nonce of this render's link markers; "" for a variant stored before there was one.
    nonce: str = ""

    @property
    def markers(self) -> dict[str, str]:
        """Each personal link's marker in this variant, by name ("unsubscribe", "preferences")."""
        return link_markers(self.nonce)


def link_markers(nonce: str) -> dict[str, str]:
    """The markers of a render with this nonce ("" gives the fixed markers of old variants).

    A nonce is drawn for each render, after the feed and staff text it carries was written, so no
    such text can contain the markers (in any form): a reader's links go only where the templates
    put them. Letters, digits and underscores: nothing in Jinja2, MJML or premailer alters them.
    """
    if not nonce:
        return {"unsubscribe": UNSUBSCRIBE_URL, "preferences": PREFERENCES_URL}
    return {
        "unsubscribe": f"%%UNSUBSCRIBE_URL_{nonce}%%",
        "preferences": f"%%PREFERENCES_URL_{nonce}%%",
        "wrote": f"%%WROTE_URL_{nonce}%%",
    }


def wrote_section(nonce: str) -> tuple[str, str]:
    """The markers around the "I sent my letter" section of a render with this nonce."""
    return f"%%WROTE_BEGIN_{nonce}%%", f"%%WROTE_END_{nonce}%%"


def has_link(variant: RenderedVariant, name: str) -> bool:
    """Whether the variant carries this personal link (an optional one may be absent)."""
    marker = variant.markers.get(name)
    return marker is not None and marker in variant.html


def without_wrote(variant: RenderedVariant, *, keep: bool) -> RenderedVariant:
    """The variant with its "I sent my letter" section kept (markers taken out) or cut out.

    Cut for a discreet reader (nothing recorded about them) and for every copy that is not one
    reader's email. The section markers carry the render's nonce, so only the template's own
    section can be cut; a variant without them is returned as it is.
    """
    if not variant.nonce:
        return variant
    begin, end = wrote_section(variant.nonce)
    html, text = variant.html, variant.text
    parts = []
    for body in (html, text):
        start, stop = body.find(begin), body.find(end)
        if start < 0 or stop < start:
            parts.append(body)
            continue
        if keep:
            body = body.replace(begin + "\n", "").replace(end + "\n", "")
            parts.append(body.replace(begin, "").replace(end, ""))
        else:
            after = stop + len(end)
            after += 1 if body[after : after + 1] == "\n" else 0
            parts.append(body[:start] + body[after:])
    return dataclasses.replace(variant, html=parts[0], text=parts[1])


@dataclasses.dataclass(frozen=True)
class _Lead:
    """What an alert is about: a portal item or the text staff wrote."""

    title: str
    body_html: str
    url: str
    published_at: datetime | None
    lang: str = ""


@dataclasses.dataclass(frozen=True)
class _Group:
    name: str
    items: tuple[ItemView, ...]


def render_variant(view: CampaignView, *, lang: str, settings: Settings) -> RenderedVariant:
    """Render the subject, HTML and text of one campaign in one language, with URL markers.

    A digest too big for the check's HTML limit is rendered again with shorter summaries (down
    to titles only), so a busy week still arrives whole instead of clipped by Gmail.
    """
    budget = settings.check.max_html_kb * 1024 - PERSONALISATION_MARGIN_BYTES
    variant = _render_once(view, lang=lang, settings=settings, summary_chars=None)
    if view.case is not None and len(variant.html.encode()) > budget:
        # Each "Write now" link carries the whole letter (a Cyrillic letter costs six bytes a
        # character): too big, the links carry the subject only; the letter stays shown, to copy.
        view = dataclasses.replace(view, case=short_mailto_links(view.case))
        return _render_once(view, lang=lang, settings=settings, summary_chars=None)
    if view.kind != "digest":
        return variant
    full = settings.render.summary_max_chars
    for fraction in SHORTER_SUMMARIES:
        if len(variant.html.encode()) <= budget:
            break
        chars = int(full * fraction)
        variant = _render_once(view, lang=lang, settings=settings, summary_chars=chars)
    return variant


def warm_up(settings: Settings) -> None:
    """Render a small alert and digest in each configured language once, and forget them.

    A process's first render of a kind compiles its templates, loads each language's
    catalogue and readies the CSS inliner: about 0.2 s of CPU for an alert in three languages,
    against 0.02 s once warm. The service does this at start, so that the first urgent alert
    after a restart goes out as soon as the next one would.
    """
    item = ItemView(
        title="Warm-up",
        link="https://example.org/warm-up",
        summary_html="<p>Warm-up.</p>",
        published_at=datetime(2026, 1, 1, tzinfo=UTC),
        categories=("Warm-up",),
    )
    for kind in ("alert", "digest"):
        view = CampaignView(kind=kind, list_name="Warm-up", items=(item,))
        for lang in settings.render.languages:
            render_variant(view, lang=lang, settings=settings)


def _render_once(
    view: CampaignView, *, lang: str, settings: Settings, summary_chars: int | None
) -> RenderedVariant:
    nonce = secrets.token_hex(16)
    context = _context(view, lang=lang, settings=settings, summary_chars=summary_chars)
    context |= _link_context(nonce)
    name = "action" if view.case else view.kind
    source = _render_template(f"email/{name}.mjml.j2", lang, context)
    page = inline_css(compile_mjml(source))
    text = tidy_text(_render_template(f"text/{name}.txt.j2", lang, context))
    variant = RenderedVariant(lang, context["subject"], page, text, nonce)
    misplaced = misplaced_links(variant, expect_all=True)
    if misplaced:  # a template (or MJML, or premailer) broke the one rule the sender relies on
        part, what = misplaced[0]
        name = "action" if view.case else view.kind
        raise RenderError(f"the {name} template ({lang} {part}) misplaces a link: {what}")
    return variant


def neutral_brand(settings: Settings) -> BrandSettings:
    """The brand's colours under the neutral identity's name: no logo, address or mirror."""
    return dataclasses.replace(
        settings.brand,
        name=settings.discreet.from_name,
        logo_text="",
        logo_url="",
        postal_address="",
        footer_lines=(),
        mirror_url="",
    )


def render_pointer(*, lang: str, copy_url: str, settings: Settings) -> RenderedVariant:
    """A pointer reader's message: the neutral subject, a short note, the web copy's link."""
    nonce = secrets.token_hex(16)
    subject = settings.discreet.subject(lang)
    context: dict[str, Any] = {
        "lang": lang,
        "dir": Locale.parse(lang).text_direction,
        "brand": neutral_brand(settings),
        "subject": subject,
        "copy_url": copy_url,
    } | _link_context(nonce)
    page = inline_css(compile_mjml(_render_template("email/pointer.mjml.j2", lang, context)))
    text = tidy_text(_render_template("text/pointer.txt.j2", lang, context))
    variant = RenderedVariant(lang, subject, page, text, nonce)
    misplaced = misplaced_links(variant, expect_all=True)
    if misplaced:
        part, what = misplaced[0]
        raise RenderError(f"the pointer template ({lang} {part}) misplaces a link: {what}")
    return variant


def render_mjml_source(view: CampaignView, *, lang: str, settings: Settings) -> str:
    """Fill the campaign's MJML template, before compilation (for previews and benchmarks)."""
    context = _context(view, lang=lang, settings=settings, summary_chars=None)
    context |= _link_context(secrets.token_hex(16))
    name = "action" if view.case else view.kind
    return _render_template(f"email/{name}.mjml.j2", lang, context)


def _link_context(nonce: str) -> dict[str, str]:
    """The template variables where a reader's links go: this render's markers."""
    markers = link_markers(nonce)
    begin, end = wrote_section(nonce)
    return {
        "unsubscribe_url": markers["unsubscribe"],
        "preferences_url": markers["preferences"],
        "wrote_url": markers["wrote"],
        "wrote_begin": begin,
        "wrote_end": end,
    }


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
    # Imported here: premailer brings cssutils and requests (0.1-0.2 s), which a sender that
    # only splices stored variants, and every other command, never needs.
    import premailer

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
    variant: RenderedVariant, *, unsubscribe_url: str, preferences_url: str, wrote_url: str = ""
) -> tuple[str, str]:
    """Put one recipient's links into a rendered variant; returns (html, text)."""
    urls = {"unsubscribe": unsubscribe_url, "preferences": preferences_url, "wrote": wrote_url}
    page, text = variant.html, variant.text
    for key, marker in variant.markers.items():
        page = page.replace(marker, html.escape(urls[key]))
        text = text.replace(marker, urls[key])
    return page, text


def misplaced_links(variant: RenderedVariant, *, expect_all: bool = False) -> list[tuple[str, str]]:
    """(part, what) for each marker that is not where the templates put it.

    The templates put each marker once in each part: in the HTML as the whole href of a link, in
    the text as a word of its own. More than once, or anywhere else (another attribute, inside a
    URL), means the marker did not come from them. With expect_all, a missing marker counts too.
    """
    found = []
    for key, marker in variant.markers.items():
        for part, body, placed in (
            ("HTML", variant.html, _is_href),
            ("text", variant.text, _is_word),
        ):
            count = body.count(marker)
            at = body.find(marker)
            if count > 1 or (count == 0 and expect_all and key not in OPTIONAL_LINKS):
                found.append((part, f"the {key} link's marker appears {count} times, not once"))
            elif count == 1 and not placed(body, at, at + len(marker)):
                found.append((part, f"the {key} link's marker is not where the template puts it"))
    return found


def _is_href(page: str, start: int, end: int) -> bool:
    """Whether page[start:end] is the whole value of the href of an <a> tag."""
    tag = page[page.rfind("<", 0, start) : start]
    return (
        tag.startswith("<a ")
        and ">" not in tag
        and tag.endswith(' href="')
        and page[end : end + 1] == '"'
    )


def _is_word(text: str, start: int, end: int) -> bool:
    """Whether text[start:end] stands between whitespace (or the ends of the text)."""
    before = text[start - 1 : start] or " "
    after = text[end : end + 1] or " "
    return before.isspace() and after.isspace()


def _refuse_include(path: str) -> str:
    # mj-include could read files from the server; our templates include with Jinja2 instead.
    raise ValueError(f"mj-include is not allowed ({path})")


# --- context ---------------------------------------------------------------------------------


def _context(
    view: CampaignView, *, lang: str, settings: Settings, summary_chars: int | None
) -> dict[str, Any]:
    """Everything the templates of one campaign and language need."""
    _check_view(view, lang)
    view = _without_trailing_links(view)
    lead = _lead(view) if view.kind == "alert" else None
    issue_date = view.issued_at or max((i.published_at for i in view.items), default=None)
    subject = _subject(view, lead, lang=lang, brand=settings.brand.name, on=issue_date)
    if view.case is not None:
        subject = case_subject(view.case, lang)
    limit = settings.render.summary_max_chars if summary_chars is None else summary_chars
    return {
        "lang": lang,
        "dir": Locale.parse(lang).text_direction,
        "brand": settings.brand,
        "logo_text": settings.brand.logo_text or settings.brand.name,
        "view": view,
        "groups": _group_by_category(view.items),
        "lead": lead,
        "issue_date": issue_date,
        "subject": _truncate(subject, settings.check.max_subject_chars - 1),
        "summary_chars": limit,
        "case": view.case,
        "web_copy_url": web_copy_url(settings.web.base_url, view.slug, view.kind, lang, settings),
        "web_copy_mirror": web_copy_url(
            settings.web.email_mirror(lang), view.slug, view.kind, lang, settings
        ),
    }


def web_copy_url(base: str, slug: str, kind: str, lang: str, settings: Settings) -> str:
    """Where a campaign's web copy in a language is under a base URL ("" when it has none)."""
    archive = settings.archive
    if not base or not slug or not archive.enabled:
        return ""
    if kind == "alert" and not archive.include_alerts:
        return ""
    return f"{base.rstrip('/')}/archive/{slug}/{lang}"


def _check_view(view: CampaignView, lang: str) -> None:
    if view.kind not in KINDS:
        raise RenderError(f"unknown campaign kind {view.kind!r}: expected one of {KINDS}")
    if lang not in LANGUAGES:
        raise RenderError(f"no translations for language {lang!r}: expected one of {LANGUAGES}")
    if view.kind == "digest" and not view.items:
        raise RenderError("a digest needs at least one item")
    if view.kind == "alert" and not (view.items or view.title):
        raise RenderError("an alert needs an item or a title")
    _check_depth(view)


def _check_depth(view: CampaignView) -> None:
    # mjml overflows its stack (the process dies) on HTML nested some thousands deep.
    fragments = [view.body_html, *(item.summary_html for item in view.items)]
    if view.case is not None:
        fragments += [view.case.body_html, view.case.actions_html, view.case.message_html]
    if any(html_depth(fragment) > MAX_HTML_DEPTH for fragment in fragments):
        raise RenderError(f"an item's HTML nests more than {MAX_HTML_DEPTH} elements deep")


def _without_trailing_links(view: CampaignView) -> CampaignView:
    """The view with each summary's own closing link to its item dropped (see below).

    Feed and staff text is otherwise left as it is: text that looks like a marker (of any render,
    old or new) stays inert text, as no render's markers can be known before it is drawn.
    """
    items = tuple(
        dataclasses.replace(item, summary_html=_drop_trailing_link(item.summary_html, item.link))
        for item in view.items
    )
    return dataclasses.replace(view, items=items)


def _drop_trailing_link(summary: str, link: str) -> str:
    """Drop the feed's own closing "Read More" link to the item: the template adds one."""
    # String operations, where an expression with a leading \s* was quadratic in a run of
    # whitespace. What goes: <a …href="LINK"…>text without "<"</a>, the whitespace before it,
    # when only whitespace and one </p> follow. The <a is the first after the last ">" that
    # precedes the start tag's own ">", so a "<a " inside an attribute value cannot be taken.
    if not link:
        return summary
    body = summary.rstrip()
    if body.endswith("</p>"):
        body = body[: -len("</p>")].rstrip()
    if not body.endswith("</a>"):
        return summary
    rest = body[: -len("</a>")]
    last_lt = rest.rfind("<")
    tag_end = rest.find(">", last_lt)
    if last_lt < 0 or tag_end < 0:
        return summary
    start = rest.find("<a ", rest.rfind(">", 0, tag_end) + 1, last_lt + 3)
    href = f'href="{html.escape(link, quote=True)}"'
    if start < 0 or href not in rest[start + 3 : tag_end]:
        return summary
    return rest[:start].rstrip() + summary[len(body) :]


def _lead(view: CampaignView) -> _Lead:
    if view.items:
        item = view.items[0]
        return _Lead(item.title, item.summary_html, item.link, item.published_at, item.lang)
    return _Lead(view.title, view.body_html, view.url, None, view.text_lang)


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
    _ = gettext_for(lang, CAMPAIGN_DOMAIN)
    if lead is None:
        day = _format_day(on, lang) if on else ""
        subject = _("%(brand)s: weekly digest, %(date)s") % {"brand": brand, "date": day}
    else:
        subject = _("Urgent action: %(title)s") % {"title": _one_line(lead.title)}
    return _one_line(subject)


def case_subject(case: CaseView, lang: str) -> str:
    """A case message's subject: its number, what it is, its title ("UA 12/26 update 1: ...")."""
    _ = gettext_for(lang, CAMPAIGN_DOMAIN)
    values = {"ref": case.reference, "n": case.number, "title": _one_line(case.title)}
    if case.role == "update":
        subject = _("%(ref)s update %(n)s: %(title)s") % values
    elif case.role == "reminder":
        subject = _("%(ref)s reminder: %(title)s") % values
    elif case.role == "closing":
        subject = _("%(ref)s closed: %(title)s") % values
    else:
        subject = _("%(ref)s: %(title)s") % values
    return _one_line(subject)


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


def _published_in(item_lang: str, lang: str) -> str:
    """ "in English" in the reader's language, or "" when the item is in the reader's language."""
    if not item_lang or item_lang == lang or item_lang not in _PUBLISHED_IN:
        return ""
    return gettext_for(lang, CAMPAIGN_DOMAIN)(_PUBLISHED_IN[item_lang])


# --- Jinja2 --------------------------------------------------------------------------------


def _render_template(name: str, lang: str, context: dict[str, Any]) -> str:
    try:
        return _environment(lang).get_template(name).render(context)
    except jinja2.TemplateError as e:
        raise RenderError(f"template {name} ({lang}) failed: {e}") from e


@functools.cache
def _environment(lang: str) -> jinja2.Environment:
    """The campaign templates' environment, one per language and process, with their filters."""
    filters: dict[str, Callable[..., str]] = {
        "day": functools.partial(_format_day, lang=lang),
        "published_in": functools.partial(_published_in, lang=lang),
        "to_text": html_to_text,
        "wrap": wrap_text,
        "shorten": shorten_html,
    }
    return make_environment(lang, CAMPAIGN_DOMAIN, filters)
