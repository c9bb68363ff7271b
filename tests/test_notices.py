"""Tests for notices.py: every notice in every language, as it arrives through real SMTP."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import LANGUAGES, Settings
from newsletter.db import unit_of_work
from newsletter.i18n import gettext_for
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.notices import render_notice, send_confirmations, send_goodbye
from newsletter.smtp import SmtpPool
from newsletter.subscriptions import subscribe
from tests.conftest import SECRET, SmtpServer, make_settings

ROOT = Path(__file__).resolve().parents[1]
# Long enough that every Subject is folded; non-ASCII, so it is folded as encoded-words.
LONG_BRAND = "Новости Правозащитного центра «Весна» и друзей Алеся Беляцкого"
SUBJECTS = {
    "confirm": "Please confirm your subscription",
    "goodbye": "You will not get any more emails from us",
}
URL_LINE = re.compile(r"https?://\S+")


def send_every_notice(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, lang: str
) -> None:
    """Mail one confirmation and both goodbyes in `lang` through the configured SMTP server."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        subscribe(
            session=session,
            email=f"reader-{lang}@example.org",
            lists=[get_list(session, "weekly-digest"), get_list(session, "urgent-actions")],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            language=lang,
        )

    async def send() -> None:
        pool = SmtpPool(settings.smtp)
        try:
            await send_confirmations(
                factory=factory, settings=settings, transport=pool, clock=clock
            )
            for reason in ("unsubscribed", "forgotten"):
                await send_goodbye(
                    email=f"reader-{lang}@example.org",
                    lang=lang,
                    reason=reason,
                    settings=settings,
                    transport=pool,
                    now=clock.now(),
                )
        finally:
            await pool.close()

    asyncio.run(send())


@pytest.fixture(params=["default-brand", "long-brand"])
def settings(request: pytest.FixtureRequest, database_url: str, smtpd: SmtpServer) -> Settings:
    """Settings pointed at the test SMTP server, with the default or a long Cyrillic brand."""
    base = make_settings(database_url, smtpd)
    if request.param == "long-brand":
        base = dataclasses.replace(base, brand=dataclasses.replace(base.brand, name=LONG_BRAND))
    return base


@pytest.fixture(params=LANGUAGES)
def received(
    request: pytest.FixtureRequest,
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    smtpd: SmtpServer,
) -> tuple[str, list[EmailMessage]]:
    """(language, the three notices as received and parsed with email.policy.default)."""
    lang = str(request.param)
    send_every_notice(factory, settings, clock, lang)
    messages = smtpd.messages()
    assert len(messages) == 3
    return lang, messages


def test_every_notice_subject_decodes_with_its_spaces(
    received: tuple[str, list[EmailMessage]], settings: Settings
) -> None:
    """The Subject decodes to the brand and the translated subject, every space in place."""
    lang, messages = received
    _ = gettext_for(lang)
    kinds = ("confirm", "goodbye", "goodbye")
    for msg, kind in zip(messages, kinds, strict=True):
        assert msg["Subject"] == f"{settings.brand.name}: {_(SUBJECTS[kind])}"
    if lang == "ru":
        assert messages[0]["Subject"].endswith(": Пожалуйста, подтвердите подписку")


def test_every_notice_text_part_is_wrapped_and_keeps_its_links_whole(
    received: tuple[str, list[EmailMessage]],
) -> None:
    """Text lines fit 78 columns unless they are one URL; the confirm link is one whole line."""
    _, messages = received
    for msg in messages:
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        for line in text.splitlines():
            assert len(line) <= 78 or URL_LINE.fullmatch(line), line
    confirm = messages[0]
    text = confirm.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = confirm.get_body(("html",)).get_content()  # type: ignore[union-attr]
    [url] = re.findall(r"https?://\S+/confirm/\S+", text)
    assert f'href="{url}"' in html  # the whole link, not broken across lines


class _Hidden(HTMLParser):
    """Finds the elements hidden with display:none and the background each one sits on."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str]] = []  # (tag, background colour in effect)
        self.hidden: list[tuple[dict[str, str], str]] = []  # (style, background)
        self.text: list[str] = []
        self._depth = 0  # > 0 while inside the first hidden element

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        style = parse_style(values.get("style", ""))
        outer = self.stack[-1][1] if self.stack else ""
        background = style.get("background-color") or values.get("bgcolor") or outer
        if tag not in ("img", "br", "meta", "link", "hr", "input"):
            self.stack.append((tag, background.lower()))
            if self._depth:
                self._depth += 1
        if style.get("display") == "none":
            self.hidden.append((style, background.lower()))
            self._depth = self._depth or 1

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1][0] == tag:
            self.stack.pop()
            if self._depth:
                self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._depth and len(self.hidden) == 1:
            self.text.append(data)


def parse_style(style: str) -> dict[str, str]:
    """An inline style attribute as {property: value}, lower-cased and stripped."""
    pairs = (part.split(":", 1) for part in style.split(";") if ":" in part)
    return {name.strip().lower(): value.strip().lower() for name, value in pairs}


def check_preheader(page: str, preview: str | None = None) -> None:
    """The page has one hidden preheader (with the given preview text) and no colour of its own."""
    finder = _Hidden()
    finder.feed(page)
    finder.close()
    [(style, background)] = finder.hidden
    assert style["display"] == "none"
    assert style.get("overflow") == "hidden" and style.get("max-height") in ("0", "0px")
    # SpamAssassin's HTML_FONT_LOW_CONTRAST fired on white preheader text on the light page.
    assert "color" not in style, style
    assert background and style.get("color") != background
    text = " ".join("".join(finder.text).split())
    assert text and (preview is None or text == preview)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_confirmation_preheader_is_hidden_without_a_colour(lang: str) -> None:
    """The confirmation's preheader is hidden by display:none, not by a colour like the page's."""
    notice = render_notice(
        "confirm",
        lang=lang,
        settings=Settings(),
        lists=("Weekly digest",),
        confirm_url="https://portal.example.org/confirm/token",
        max_age_hours=48,
    )
    check_preheader(notice.html, gettext_for(lang)("One click to confirm, or ignore this email."))
