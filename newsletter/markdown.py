"""Staff text in a small Markdown subset, made into HTML the feed allow-list lets through.

markdown-it-py's "zero" preset with only what an alert needs: paragraphs, line breaks, emphasis
and strong, links, lists, block quotes and headings. Raw HTML is off (typed tags stay text),
images are off (a remote image is a tracking pixel), and the output goes through
sanitize.clean_html, the same allow-list as feed content, so the rules for what reaches an inbox
are written once.
"""

from __future__ import annotations

from markdown_it import MarkdownIt
from markdown_it.parser_block import ParserBlock
from markdown_it.rules_block import StateBlock
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


class _Blocks(ParserBlock):
    """markdown-it's block parser, keeping as text what lies past MAX_NESTING.

    At the limit, markdown-it skips the rest of its range: a list nested ten deep lost its
    deepest item and every paragraph after the list, silently, from an alert. Here the lines it
    would skip become one paragraph (the deeper markers in it stay as typed).
    """

    def tokenize(self, state: StateBlock, startLine: int, endLine: int) -> None:
        """Tokens for the lines of a range, those past the nesting limit as one paragraph."""
        if state.level < state.md.options.maxNesting:
            super().tokenize(state, startLine, endLine)
            return
        # The lines the nested block owns, as markdown-it's own loop counts them: up to the
        # first non-blank line indented less than the block.
        line = stop = state.skipEmptyLines(startLine)
        while stop < endLine and (state.isEmpty(stop) or state.sCount[stop] >= state.blkIndent):
            stop += 1
        state.line = stop
        text = state.getLines(line, stop, state.blkIndent, False).strip()
        if not text:
            return
        state.push("paragraph_open", "p", 1).map = [line, stop]
        inline = state.push("inline", "", 0)
        inline.content, inline.map, inline.children = text, [line, stop], []
        state.push("paragraph_close", "p", -1)


def _parser() -> MarkdownIt:
    options = {"html": False, "linkify": False, "breaks": True, "maxNesting": MAX_NESTING}
    md = MarkdownIt("zero", options)
    blocks = _Blocks()
    blocks.ruler = md.block.ruler  # the preset's rules, as enabled
    md.block = blocks
    return md.enable(RULES)


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
