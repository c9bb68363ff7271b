"""Staff text in a small Markdown subset, made into HTML the feed allow-list lets through.

markdown-it-py's "zero" preset with only what an alert needs: paragraphs, line breaks, emphasis
and strong, links, lists, block quotes and headings. Raw HTML is off (typed tags stay text),
images are off (a remote image is a tracking pixel), and the output goes through
sanitize.clean_html, the same allow-list as feed content, so the rules for what reaches an inbox
are written once.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.token import Token

from newsletter.errors import CampaignError
from newsletter.i18n import N_
from newsletter.sanitize import clean_html

MAX_MARKDOWN_CHARS = 20_000
# Block quotes and lists nested deeper than this stay text: well under sanitize.MAX_HTML_DEPTH.
MAX_NESTING = 20
RULES = ["paragraph", "newline", "emphasis", "link", "autolink", "list", "blockquote", "heading"]
# The allow-list has h3 and h4 only: "#" is the alert's section heading, "##" and deeper below it.
HEADING_TAGS = {"h1": "h3"}


def _parser() -> MarkdownIt:
    options = {"html": False, "linkify": False, "breaks": True, "maxNesting": MAX_NESTING}
    return MarkdownIt("zero", options).enable(RULES)


_MD = _parser()


def markdown_to_html(text: str, *, base_url: str) -> str:
    """Turn staff Markdown into sanitised HTML; too long a text raises CampaignError."""
    if len(text) > MAX_MARKDOWN_CHARS:
        raise CampaignError.of(
            N_("the text has %(length)s characters, over the limit of %(limit)s"),
            length=f"{len(text):,}",
            limit=f"{MAX_MARKDOWN_CHARS:,}",
        )
    tokens = _MD.parse(text.replace("\x00", ""))
    for token in tokens:
        _shift_heading(token)
    return clean_html(_MD.renderer.render(tokens, _MD.options, {}), base_url=base_url)


def _shift_heading(token: Token) -> None:
    if token.type in ("heading_open", "heading_close"):
        token.tag = HEADING_TAGS.get(token.tag, "h4")
