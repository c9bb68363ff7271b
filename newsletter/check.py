"""The check before every send: refuse a campaign whose email would not arrive whole and safe.

Each rendered variant is built into the message a real recipient would get (message.py, with
signed links for a made-up subscriber), then checked for:

- size: the HTML part over [check] max_html_kb (Gmail clips at about 102 KB, hiding the footer
  with the unsubscribe link);
- the reader's personal links (unsubscribe, preferences): each exactly once in each part, in the
  place the templates give it (the whole href of a link; a word of its own in the text), and
  nowhere else: not in another attribute, not inside a URL, not twice;
- any other reader's own page (unsubscribe, preferences, confirm, key, "I sent my letter"),
  under the portal's address, the discreet readers' one or a mirror: someone's link pasted into
  a text would act for them, whoever clicks it;
- unsubscribing: a link to the recipient's unsubscribe URL in the HTML, the URL in the text, and
  the List-Unsubscribe, List-Unsubscribe-Post (RFC 8058 one-click) and List-Id headers;
- the subject: empty, over [check] max_subject_chars, or with a line break;
- anything the sanitiser would have removed: scripts and other active elements, event handler
  attributes, javascript:/vbscript:/data: URLs, CSS expressions;
- links (and image sources) that are not https ([check] require_https) or point at a host
  outside [check] allowed_link_hosts.

Every problem is one line saying where (language, part, item) and what. Every edge starts a
campaign through enqueue.launch_campaign, which calls require_clean(); --force records an
override in events.
"""

from __future__ import annotations

import posixpath
import re
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from email.message import EmailMessage
from ipaddress import ip_address
from urllib.parse import SplitResult, unquote, urlsplit

from lxml import html as lxml_html
from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import Campaign, Variant
from newsletter.db.queries import campaign_events
from newsletter.errors import CampaignError
from newsletter.message import ListInfo, Recipient, build_message, link_urls
from newsletter.render import PERSONAL_LINKS, RenderedVariant, misplaced_links
from newsletter.tokens import PAGE_PATHS
from newsletter.variants import render_campaign, store_case_copies, store_variants

CHECK_RECIPIENT = Recipient(subscriber_id=0, email="check@example.org", name="Check")
FORCED = "campaign.check_forced"
PASSED = "campaign.checked"
SMUGGLED = "a feed or text may be redirecting readers' links"
# Elements a sanitised email never needs; each can run code, submit data or load a document.
ACTIVE_TAGS = frozenset(
    {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "form", "input"}
    | {"button", "textarea", "select", "base", "svg", "math", "portal", "video", "audio"}
)
URL_ATTRIBUTES = ("href", "src", "action", "formaction", "background", "poster", "xlink:href")
UNSAFE_SCHEMES = frozenset({"javascript", "vbscript", "data", "livescript"})
SAFE_SCHEMES = frozenset({"mailto", "tel"})
# Why each expression below is linear on any input:
# a scheme (a few literal letters) then one class repeated to the end of the URL, which always
# ends the match where the run ends: nothing after it to fail, so no backtracking;
_TEXT_URL = re.compile(r"\b(?:https?|ftp|javascript|data):[^\s<>\"')]+", re.IGNORECASE)
# one character class, no quantifier;
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]")
# literals, each \s* run followed by one fixed character: a run after a keyword is scanned by
# that keyword's attempt only;
_CSS_DANGER = re.compile(r"expression\s*\(|javascript:|url\s*\(|@import|behavior\s*:", re.I)
# "<http" then one class that stops at the next "<" or ">": the runs tried from different "<"
# never overlap. (With [^>]+, each "<https://" without a ">" rescanned the rest: quadratic.)
_LIST_UNSUBSCRIBE_URL = re.compile(r"<https?://[^<>]+>")
# The pages a reader's own signed token opens (each acts for that reader: unsubscribes them,
# counts their letter, ...). Not "copy": a web copy's token names a campaign and a language only.
READER_PAGES = tuple(purpose for purpose in PAGE_PATHS if purpose != "copy")


@dataclass(frozen=True)
class Problem:
    """One reason to refuse a campaign: where it is and what is wrong, for one line."""

    code: str
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


class CheckError(CampaignError):
    """The check refused a campaign; `problems` lists every reason."""

    def __init__(self, campaign_id: int | None, problems: Sequence[Problem]) -> None:
        self.campaign_id = campaign_id
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        name = f"campaign {campaign_id}" if campaign_id else "the campaign"
        super().__init__(
            f"{name} refused by the check: {problems[0]}{more}; fix it, or send with --force"
        )


def check_campaign(session: Session, campaign: Campaign, settings: Settings) -> list[Problem]:
    """Every problem of the campaign's variants, one per line; [] means it may be sent.

    The stored variants are what the sender will send; a campaign not rendered yet is rendered
    and stored here (flushed, not committed), so what is checked is what goes out. So is one not
    started whose variants an older version stored, with the fixed link markers.
    """
    variants = stored_variants(session, campaign)
    old = any(not v.nonce for v in variants) and campaign.started_at is None
    if not variants or old:
        variants = render_campaign(campaign, settings=settings)
        store_variants(session, campaign, variants)
        store_case_copies(session, campaign, settings)
    ml = campaign.mailing_list
    mlist = ListInfo(ml.id, ml.slug, ml.list_id)
    found: list[Problem] = []
    for variant in variants:
        found.extend(
            check_variant(variant, mlist=mlist, settings=settings, now=campaign.created_at)
        )
    return merge_languages(found)


def stored_variants(session: Session, campaign: Campaign) -> list[RenderedVariant]:
    """The variants stored for a campaign, in a stable order."""
    rows = session.scalars(
        select(Variant).where(Variant.campaign_id == campaign.id).order_by(Variant.lang)
    )
    return [RenderedVariant(r.lang, r.subject, r.html, r.text, r.link_nonce) for r in rows]


def check_variant(
    variant: RenderedVariant, *, mlist: ListInfo, settings: Settings, now: datetime
) -> list[Problem]:
    """The problems of one language's email, as a real recipient would get it."""
    settings = _with_secret(settings)
    message = build_message(
        variant=variant,
        campaign_id=0,
        recipient=CHECK_RECIPIENT,
        mlist=mlist,
        settings=settings,
        now=now,
    )
    # As build_message made them: a case's first message carries a "wrote" link to case 0.
    urls = link_urls(recipient=CHECK_RECIPIENT, mlist=mlist, settings=settings, case_id=0)
    found = check_message(
        message,
        lang=variant.lang,
        subject=variant.subject,
        unsubscribe_url=urls["unsubscribe"],
        settings=settings,
    )
    misplaced = list(_check_markers(variant))
    placed = _check_personal_links(message, urls, variant.lang, settings)
    pasted = _check_reader_pages(message, variant.lang, settings, own=urls["wrote"])
    return [*found, *(misplaced or placed), *pasted]


def check_message(
    message: EmailMessage, *, lang: str, subject: str, unsubscribe_url: str, settings: Settings
) -> list[Problem]:
    """The problems of one built message whose unsubscribe link should be unsubscribe_url."""
    html, text = _bodies(message)
    tree = lxml_html.document_fromstring(html or "<html></html>")
    return [
        *_check_size(html, lang, settings),
        *_check_unsubscribe(tree, text, message, unsubscribe_url, lang),
        *_check_subject(subject, lang, settings),
        *_check_active_content(tree, lang),
        *_check_links(_links(tree, text), lang, settings),
    ]


def require_clean(
    session: Session,
    campaign: Campaign,
    settings: Settings,
    *,
    force: bool,
    actor: str,
    now: datetime,
) -> list[Problem]:
    """Stop a campaign that fails the check, unless forced now or before for these problems.

    A pass, and an override, are recorded in events; an override made earlier (for example by
    `newsletter check ID --force`) holds only while the problems stay the same.
    """
    problems = check_campaign(session, campaign, settings)
    lines = [str(p) for p in problems]
    if not problems:
        record_event(session, now=now, actor=actor, action=PASSED, campaign=campaign.id)
        session.flush()
        return []
    if force or _was_forced(session, campaign.id, lines):
        record_event(
            session, now=now, actor=actor, action=FORCED, campaign=campaign.id, problems=lines
        )
        session.flush()
        return problems
    raise CheckError(campaign.id, problems)


def merge_languages(problems: Iterable[Problem]) -> list[Problem]:
    """Fold the same problem in several languages into one line ("en, be, ru HTML: ...")."""
    merged: dict[tuple[str, str, str], list[str]] = {}
    for p in problems:
        lang, _, rest = p.where.partition(" ")
        merged.setdefault((p.code, rest, p.what), []).append(lang)
    return [
        Problem(code, f"{', '.join(dict.fromkeys(langs))} {rest}".strip(), what)
        for (code, rest, what), langs in merged.items()
    ]


# --- the checks ------------------------------------------------------------------------------


def _check_size(html: str, lang: str, settings: Settings) -> Iterator[Problem]:
    size = len(html.encode("utf-8"))
    limit = settings.check.max_html_kb
    if size > limit * 1024:
        yield Problem(
            "html-too-big",
            f"{lang} HTML",
            f"{size / 1024:.1f} KB, over the {limit} KB limit (Gmail clips the rest, "
            "unsubscribe link included): fewer or shorter items",
        )


def _check_unsubscribe(
    tree: lxml_html.HtmlElement, text: str, message: EmailMessage, url: str, lang: str
) -> Iterator[Problem]:
    if url not in {a.get("href") for a in tree.iter("a")}:
        yield Problem("no-unsubscribe", f"{lang} HTML", "no link to the unsubscribe page")
    if url not in text:
        yield Problem("no-unsubscribe", f"{lang} text", "no unsubscribe link")
    list_unsubscribe = str(message.get("List-Unsubscribe", ""))
    if not _LIST_UNSUBSCRIBE_URL.search(list_unsubscribe):
        yield Problem("headers", f"{lang} headers", "List-Unsubscribe has no https link")
    if str(message.get("List-Unsubscribe-Post", "")) != "List-Unsubscribe=One-Click":
        yield Problem(
            "headers", f"{lang} headers", "List-Unsubscribe-Post is not List-Unsubscribe=One-Click"
        )
    if not str(message.get("List-Id", "")).strip():
        yield Problem("headers", f"{lang} headers", "no List-Id")


def _check_markers(variant: RenderedVariant) -> Iterator[Problem]:
    """Markers the sender would refuse (out of place, or twice), and missing preferences links."""
    for part, what in misplaced_links(variant):
        yield Problem("links", f"{variant.lang} {part}", f"{what} ({SMUGGLED}; never sent)")
    marker = variant.markers["preferences"]
    for part, body in (("HTML", variant.html), ("text", variant.text)):
        if marker not in body:
            yield Problem("links", f"{variant.lang} {part}", "no link to the preferences page")


def _check_personal_links(
    message: EmailMessage, urls: dict[str, str], lang: str, settings: Settings
) -> list[Problem]:
    """Each personal link, as the reader gets it, once in each part and only in its own place.

    Looked for by its signed token and by its page (so a link to someone's unsubscribe page,
    pasted into an alert, is refused as well): in the HTML only as the whole href of one <a>, in
    the text only as a word of its own.
    """
    html, text = _bodies(message)
    tree = lxml_html.document_fromstring(html or "<html></html>")
    base = settings.web.base_url.rstrip("/")
    found = []
    for key in PERSONAL_LINKS:
        url = urls[key]
        for needle in (url.rpartition("/")[2], base + PAGE_PATHS[key]):
            where = _html_places(tree, needle)
            if html.count(needle) > 1 or len(where) > 1:
                found.append(Problem("links", f"{lang} HTML", f"the {key} link appears twice"))
            elif where and where != [("a", "href", url)]:
                found.append(Problem("links", f"{lang} HTML", f"the {key} link is out of place"))
            if text.count(needle) > 1:
                found.append(Problem("links", f"{lang} text", f"the {key} link appears twice"))
            elif needle in text and url not in text.split():
                found.append(Problem("links", f"{lang} text", f"the {key} link is out of place"))
    return [replace(p, what=f"{p.what} ({SMUGGLED})") for p in dict.fromkeys(found)]


def _check_reader_pages(
    message: EmailMessage, lang: str, settings: Settings, *, own: str
) -> list[Problem]:
    """A link to any reader's own page but the reader's own "I sent my letter" link (`own`,
    placed by _check_markers) and those _check_personal_links sees (each one starting with
    [web] base_url as written and the unsubscribe or preferences page: it allows the reader's
    own links, once each, and nothing else that starts so).

    Looked for with or without a scheme, in any letter case: in the HTML as written and as parsed
    (entities decoded), in the text, and in every link as a browser would follow it.
    """
    html, text = _bodies(message)
    tree = lxml_html.document_fromstring(html or "<html></html>")
    base = settings.web.base_url.rstrip("/")
    placed = tuple(base + PAGE_PATHS[key] for key in PERSONAL_LINKS)
    blank = tuple(p for p in (*placed, own) if p)
    html_links = [url for url, _ in _links(tree, "")]
    text_links = [m.group(0) for m in _TEXT_URL.finditer(text)]
    parsed = [value for _, _, value in _html_values(tree)]
    parts = {
        "HTML": [html, *parsed, *_followed(u for u in html_links if not _placed(u, placed, own))],
        "text": [text, *_followed(u for u in text_links if not _placed(u, placed, own))],
    }
    pages = _reader_pages(settings)
    found = []
    for part, bodies in parts.items():
        # One string: a page's address holds no line break, so no match spans two bodies.
        kept = _without("\n".join(bodies), blank)
        found += [
            Problem("links", f"{lang} {part}", f"a link to a reader's own {key} page ({SMUGGLED})")
            for key in dict.fromkeys(key for key, _, page in pages if page.search(kept))
        ]
    return found


def _placed(url: str, placed: tuple[str, ...], own: str) -> bool:
    """Whether another check sees to this link: the reader's own, or one _check_personal_links
    counts (it refuses any but the reader's own link that starts so)."""
    return url == own or url.startswith(placed)


def _without(body: str, prefixes: Iterable[str]) -> str:
    """The body with these prefixes blanked out (the links another check places)."""
    for prefix in prefixes:
        body = body.replace(prefix, " ")
    return body


def _followed(urls: Iterable[str]) -> Iterator[str]:
    """Each link as the host and path a browser asks for: percent-escapes decoded, backslashes
    read as slashes, dot segments resolved (a doubled slash is merged too: stricter, not laxer),
    the host as _host_port writes it (no user, no trailing dot, no default port)."""
    for url in urls:
        parts = urlsplit(url.strip().replace("\\", "/"))
        path = unquote(parts.path)
        resolved = posixpath.normpath(path) if path else ""
        tail = "/" if path.endswith("/") and resolved != "/" else ""
        yield _host_port(parts) + resolved + tail


def _host_port(parts: SplitResult) -> str:
    """A URL's host as a browser reaches it: lower case, without a user, a trailing dot, or the
    scheme's default port ("news.example.org.:443" is "news.example.org")."""
    try:
        port = parts.port
    except ValueError:  # not a number: no browser goes there
        port = None
    host = unquote(parts.hostname or "").rstrip(".")
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    return host if port is None or port == default else f"{host}:{port}"


def _reader_pages(settings: Settings) -> list[tuple[str, str, re.Pattern[str]]]:
    """(page, its address, pattern) for each reader's page under each base of ours: [web]
    base_url, the discreet readers' links and the mirrors."""
    web = settings.web.base_url
    bases = (web, settings.discreet.links_base(web), *settings.web.mirror_urls)
    found = []
    for base in dict.fromkeys(b.rstrip("/") for b in bases if b):
        parts = urlsplit(base)
        for key in READER_PAGES:
            # Linear: a literal after a one-character lookbehind, which keeps
            # "oldnews.example.org/u/" from counting as "news.example.org/u/".
            where = re.escape(_host_port(parts) + parts.path + PAGE_PATHS[key])
            page = re.compile(r"(?<![\w.-])" + where, re.IGNORECASE)
            found.append((key, base + PAGE_PATHS[key], page))
    return found


def _html_values(tree: lxml_html.HtmlElement) -> Iterator[tuple[str, str, str]]:
    """(tag, attribute or "text", value) for every text, tail and attribute of the parsed HTML."""
    for node in tree.iter():
        tag = node.tag if isinstance(node.tag, str) else "comment"
        yield tag, "text", node.text or ""
        yield tag, "text", node.tail or ""
        if isinstance(node.tag, str):
            yield from ((tag, name, value) for name, value in node.attrib.items())


def _html_places(tree: lxml_html.HtmlElement, needle: str) -> list[tuple[str, str, str]]:
    """(tag, attribute or "text", value) for each occurrence of needle in the parsed HTML."""
    return [
        (tag, name, value)
        for tag, name, value in _html_values(tree)
        for _ in range(value.count(needle))
    ]


def _check_subject(subject: str, lang: str, settings: Settings) -> Iterator[Problem]:
    where = f"{lang} subject"
    limit = settings.check.max_subject_chars
    if not subject.strip():
        yield Problem("subject", where, "empty")
    if len(subject) > limit:
        yield Problem("subject", where, f"{len(subject)} characters, over {limit}")
    if _LINE_BREAKS.search(subject):
        yield Problem("subject", where, "contains a line break")


def _check_active_content(tree: lxml_html.HtmlElement, lang: str) -> Iterator[Problem]:
    for element in tree.iter():
        if not isinstance(element.tag, str):  # comments (MSO conditionals), processing instr.
            continue
        tag = element.tag.lower()
        where = f"{lang} HTML, {_locate(element)}"
        if tag in ACTIVE_TAGS:
            yield Problem("unsafe", where, f"a <{tag}> element")
        if tag == "meta" and (element.get("http-equiv") or "").lower() == "refresh":
            yield Problem("unsafe", where, "a <meta http-equiv=refresh> redirect")
        yield from _unsafe_attributes(element, tag, where)


def _unsafe_attributes(element: lxml_html.HtmlElement, tag: str, where: str) -> Iterator[Problem]:
    for name, value in element.attrib.items():
        name = name.lower()
        if name.startswith("on"):
            yield Problem("unsafe", where, f"an event handler <{tag} {name}=...>")
        elif name in URL_ATTRIBUTES and _scheme(value) in UNSAFE_SCHEMES:
            yield Problem("unsafe", where, f"a {_scheme(value)}: URL in <{tag} {name}>")
        elif name == "style" and _CSS_DANGER.search(value):
            yield Problem("unsafe", where, f"active or remote CSS in <{tag} style>")


def _check_links(
    links: Iterable[tuple[str, str]], lang: str, settings: Settings
) -> Iterator[Problem]:
    seen: set[str] = set()
    for url, location in links:
        if url in seen:
            continue
        seen.add(url)
        what = _link_problem(url, settings)
        if what:
            code = "host" if what.startswith("host") else "link"
            yield Problem(code, f"{lang} {location}", f"{what}: {_short(url)}")


def _link_problem(url: str, settings: Settings) -> str:
    """Why a link may not be sent, or ""."""
    scheme = _scheme(url)
    if scheme in SAFE_SCHEMES:
        return ""
    if scheme in UNSAFE_SCHEMES:
        return ""  # reported by the active-content check
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    ours = host == (urlsplit(settings.web.base_url).hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        return "not a web link"
    if scheme == "http" and settings.check.require_https and not (ours and _is_loopback(host)):
        return "not https"
    if not ours and not _host_allowed(host, settings.check.allowed_link_hosts):
        return f"host {host} is not in [check] allowed_link_hosts"
    return ""


def item_problem(title: str, link: str, summary_html: str, settings: Settings) -> str:
    """Why a digest carrying this item would be refused by the check, or "": a link it may not
    send (not https, a host not allowed, not a web link), or one of the readers' own pages
    named anywhere in it (which the check takes for a personal link smuggled in)."""
    tree = lxml_html.document_fromstring(f"<html><body>{summary_html}</body></html>")
    text = " ".join((title, tree.text_content()))
    urls = [url for url, _ in _links(tree, text)]
    urls = [link, *urls] if link else urls
    for url in urls:
        what = _link_problem(url, settings)
        if what:
            return f"{what}: {_short(url)}"
    parsed = (value for _, _, value in _html_values(tree))
    everything = [title, link, summary_html, text, *parsed, *_followed(urls)]
    for key, shown, page in _reader_pages(settings):
        if any(map(page.search, everything)):
            return f"it names the readers' {key} page ({shown})"
    return ""


def _host_allowed(host: str, allowed: Sequence[str]) -> bool:
    if not allowed:
        return True
    for entry in (e.lower() for e in allowed):
        if host == entry.lstrip(".") or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


# --- helpers ---------------------------------------------------------------------------------


def _links(tree: lxml_html.HtmlElement, text: str) -> Iterator[tuple[str, str]]:
    """(url, where) for every link and resource in the HTML, then every URL in the text."""
    for element in tree.iter():
        if not isinstance(element.tag, str):
            continue
        for name in ("href", "src", "background"):
            value = element.get(name)
            if value is not None and element.tag.lower() not in ("base",):
                yield value, f"HTML, {_locate(element)}"
    for match in _TEXT_URL.finditer(text):
        yield match.group(0).rstrip(".,;:!?"), "text"


def _locate(element: lxml_html.HtmlElement) -> str:
    """A reader's idea of where an element is: the item it belongs to, the footer, the body."""
    ancestors = [(a, (a.get("class") or "").split()) for a in element.iterancestors()]
    for ancestor, classes in ancestors:
        if "item" in classes:
            heading = ancestor.find(".//h3")
            title = _readable_text(heading if heading is not None else ancestor)
            return f"item «{_short(' '.join(title.split()), 60)}»"
    if any("summary" in classes for _, classes in ancestors):
        return "main text"
    if element.tag == "a" and "fine" in (element.getparent().get("class") or "").split():
        return "footer"
    return "body"


def _readable_text(element: lxml_html.HtmlElement) -> str:
    """The text a reader sees in an element: what scripts and styles hold is left out."""
    parts = []
    for node in element.iter():
        if isinstance(node.tag, str) and node.tag.lower() not in ("script", "style"):
            parts.append(node.text or "")
        if node is not element:
            parts.append(node.tail or "")
    return "".join(parts)


def _bodies(message: EmailMessage) -> tuple[str, str]:
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    html = str(html_part.get_content()) if html_part is not None else ""
    text = str(text_part.get_content()) if text_part is not None else ""
    return html, text


def _scheme(url: str) -> str:
    # Browsers ignore whitespace and control characters inside a scheme ("java\tscript:").
    compact = "".join(ch for ch in url if ch > " ").lower()
    return compact.split(":", 1)[0] if ":" in compact else ""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _short(value: str, limit: int = 100) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "…"


def _with_secret(settings: Settings) -> Settings:
    # The check signs links for a made-up subscriber only; it must work before a secret is set.
    if settings.security.secret:
        return settings
    security = replace(settings.security, secret=secrets.token_urlsafe(32))
    return replace(settings, security=security)


def _was_forced(session: Session, campaign_id: int, lines: list[str]) -> bool:
    return any(
        event.detail.get("problems") == lines
        for event in campaign_events(session, campaign_id, action=FORCED)
    )
