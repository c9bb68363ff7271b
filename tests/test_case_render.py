"""The messages of an urgent-action case: email/action.mjml.j2 and text/action.txt.j2.

Cases and messages are model instances made in memory (no database): make_case_view turns them
into the view the templates get, render_variant renders it as any campaign.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import date
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from babel.dates import format_date
from lxml import html as lxml_html

from newsletter.case_view import make_case_view
from newsletter.config import Settings
from newsletter.db.models import ActionCase, CaseMessage
from newsletter.render import (
    CampaignView,
    RenderedVariant,
    has_link,
    misplaced_links,
    personalise,
    render_variant,
    without_wrote,
    wrote_section,
)

LANGS = ("en", "be", "ru")
ROLES = ("first", "update", "reminder", "closing")
DEADLINE = date(2026, 12, 20)
PERSON = "Алесь Бяляцкі"
EMAIL = "prokuratura@example.by"
SALUTATION = "Паважаны спадар Генеральны пракурор!"
POSTAL = ("вул. Калектарная, 10", "220004 Мінск", "Беларусь")
EMAIL_TARGET = {
    "name": "Генеральны пракурор",
    "title": "Пракуратура Рэспублікі Беларусь",
    "email": EMAIL,
    "postal": "",
    "salutation": SALUTATION,
    "language": "be, ru",
}
POSTAL_TARGET = {
    "name": "Міністр юстыцыі",
    "title": "",
    "email": "",
    "postal": "\n".join(POSTAL),
    "salutation": "Паважаны спадар Міністр!",
    "language": "",
}
# Each letter has line breaks, a blank line, and the characters a mailto: query must encode.
LETTERS = {
    "en": {
        "subject": "Release Ales Bialiatski & his colleagues",
        "body": "I am writing about Ales Bialiatski.\nHe is held for his work (100% peaceful).\n\n"
        "Release him now? Yes: a=b & c#d.\n\nYours sincerely,",
    },
    "be": {
        "subject": "Вызваліце Алеся Бяляцкага & калег",
        "body": "Пішу вам пра Алеся Бяляцкага.\nЁн трымаецца пад вартай за сваю працу.\n\n"
        "Вызваліце яго: 100% & «зараз»?\n\nЗ павагай,",
    },
    "ru": {
        "subject": "Освободите Алеся Беляцкого",
        "body": "Пишу вам об Алесе Беляцком.\nОн содержится под стражей за свою работу.\n\n"
        "Освободите его немедленно!\n\nС уважением,",
    },
}


def make_case(**changes: Any) -> ActionCase:
    """A case as staff make it: two targets (email, post), a letter in each language."""
    fields: dict[str, Any] = {
        "reference": "UA 7/26",
        "title": "Вызваліце праваабаронцу",
        "person": PERSON,
        "person_public": False,
        "deadline": DEADLINE,
        "targets": [EMAIL_TARGET, POSTAL_TARGET],
        "letters": LETTERS,
        "status": "open",
        "outcome": "",
        "body_html": "<p>Праваабаронца асуджаны на дзесяць гадоў.</p>",
        "actions_html": "<p>Падзяліцеся гэтай акцыяй.</p>",
    }
    return ActionCase(**(fields | changes))


def render_case(
    role: str,
    lang: str,
    *,
    number: int = 0,
    message_html: str = "",
    public: bool = False,
    settings: Settings | None = None,
    **case_changes: Any,
) -> RenderedVariant:
    """One message of the case in one language, rendered as variants.render_campaign does."""
    case = make_case(**case_changes)
    message = CaseMessage(role=role, number=number, body_html=message_html)
    view = CampaignView(
        kind="alert",
        list_name="Акцыі",
        items=(),
        title=case.title,
        body_html=message_html,
        case=make_case_view(
            case, message, lang=lang, default_lang="en", zone="Europe/Minsk", public=public
        ),
    )
    return render_variant(view, lang=lang, settings=settings or Settings())


def visible_text(page: str) -> str:
    """The text a reader sees in the HTML part (preheader included), whitespace collapsed."""
    body = lxml_html.document_fromstring(page).body
    for style in body.iter("style"):
        style.drop_tree()
    return one_line(body.text_content())


def mailto_hrefs(page: str) -> list[str]:
    """The href of each mailto: link of the HTML part, as a mail app reads it (decoded)."""
    hrefs = (a.get("href") or "" for a in lxml_html.document_fromstring(page).iter("a"))
    return [href for href in hrefs if href.startswith("mailto:")]


def mailto_fields(href: str) -> tuple[str, dict[str, str]]:
    """(address, {field: value}) of a mailto: URI, percent-decoded strictly (RFC 6068)."""
    parts = urlsplit(href)
    assert parts.scheme == "mailto"
    fields = {}
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        fields[name] = unquote(value, errors="strict")
    return unquote(parts.path), fields


def one_line(text: str) -> str:
    """Whitespace collapsed to single spaces (as visible_text does; also Babel's no-break ones)."""
    return " ".join(text.split())


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


# --- the letter and the targets ---------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_each_language_carries_its_own_letter(lang: str) -> None:
    """The reader's letter is in both parts, line for line; the other languages' are not."""
    variant = render_case("first", lang)
    letter = LETTERS[lang]
    page = visible_text(variant.html)
    assert letter["subject"] in page and letter["subject"] in variant.text
    for line in letter["body"].splitlines():
        assert line in page
    assert letter["body"] in variant.text  # as is: its line breaks, unwrapped
    for other, other_letter in LETTERS.items():
        if other != lang:
            assert other_letter["subject"] not in page + variant.text


@pytest.mark.parametrize("lang", LANGS)
def test_letter_keeps_its_line_breaks_in_html(lang: str) -> None:
    """In the HTML a blank line starts a paragraph and a line break is a <br>."""
    variant = render_case("first", lang)
    letter = lxml_html.document_fromstring(variant.html).find_class("letter")
    assert len(letter) == 1
    paragraphs = [
        "\n".join(p.xpath("text()")) for p in letter[0].iter("p") if not p.xpath("strong")
    ]
    assert paragraphs == LETTERS[lang]["body"].split("\n\n")


@pytest.mark.parametrize("lang", LANGS)
def test_write_now_link_gives_back_the_exact_letter(lang: str) -> None:
    """The email target's link opens a mail to it with the letter, salutation first, CRLF."""
    variant = render_case("first", lang)
    hrefs = mailto_hrefs(variant.html)
    assert len(hrefs) == 1  # the postal target has none
    address, fields = mailto_fields(hrefs[0])
    letter = LETTERS[lang]
    assert address == EMAIL
    assert fields == {
        "subject": letter["subject"],
        "body": crlf(f"{SALUTATION}\n\n{letter['body']}"),
    }
    # In the HTML source the query's "&" is escaped, and nothing in it is left unencoded.
    assert "?subject=" in variant.html and "&amp;body=" in variant.html
    assert not re.search(r"\s", hrefs[0])


def test_write_now_link_is_a_labelled_button() -> None:
    """The link is the "Write now" button, under the target's name and shown address."""
    variant = render_case("first", "be")
    tree = lxml_html.document_fromstring(variant.html)
    (link,) = (a for a in tree.iter("a") if (a.get("href") or "").startswith("mailto:"))
    assert link.text_content().strip() == "Напісаць зараз"
    page = visible_text(variant.html)
    assert page.index(EMAIL_TARGET["name"]) < page.index(EMAIL) < page.index("Напісаць зараз")


@pytest.mark.parametrize("lang", LANGS)
def test_postal_target_shows_its_address_line_by_line(lang: str) -> None:
    """The postal target gets no link, its address in an <address>, one line each, in order."""
    variant = render_case("first", lang)
    tree = lxml_html.document_fromstring(variant.html)
    (address,) = tree.iter("address")
    assert [line.strip() for line in address.xpath("text()")] == list(POSTAL)
    assert len(address.findall("br")) == len(POSTAL) - 1
    lines = [line.strip() for line in variant.text.splitlines()]
    at = lines.index(POSTAL[0])
    assert lines[at : at + len(POSTAL)] == list(POSTAL)
    for href in mailto_hrefs(variant.html):
        _address, fields = mailto_fields(href)
        assert POSTAL_TARGET["salutation"] not in fields["body"]


@pytest.mark.parametrize("lang", LANGS)
def test_text_part_has_no_mailto_links(lang: str) -> None:
    """The text part names the address and asks to copy the letter: no huge mailto: URLs."""
    variant = render_case("first", lang)
    assert "mailto:" not in variant.text
    assert EMAIL in variant.text
    assert SALUTATION in variant.text
    assert "%D0" not in variant.text


def test_targets_show_their_title_languages_and_salutation() -> None:
    """Each target's title, the languages it reads and how to begin are shown in both parts."""
    variant = render_case("first", "en")
    page = visible_text(variant.html)
    for expected in (
        EMAIL_TARGET["title"],
        "Write in: be, ru",
        f"Begin with: {SALUTATION}",
        f"Begin with: {POSTAL_TARGET['salutation']}",
    ):
        assert expected in page
        assert expected in variant.text


def test_letter_from_another_language_is_marked() -> None:
    """A reader whose language has no letter gets the default one, marked and tagged."""
    letters = {k: v for k, v in LETTERS.items() if k != "ru"}
    variant = render_case("first", "ru", letters=letters)
    tree = lxml_html.document_fromstring(variant.html)
    assert [div.get("lang") for div in tree.find_class("letter")] == ["en"]
    assert "на английском языке" in visible_text(variant.html)
    assert "на английском языке" in variant.text
    assert LETTERS["en"]["body"] in variant.text
    _address, fields = mailto_fields(mailto_hrefs(variant.html)[0])
    assert fields["subject"] == LETTERS["en"]["subject"]


def test_letter_in_the_readers_language_is_not_marked() -> None:
    """A Russian reader with a Russian letter sees no language note."""
    variant = render_case("first", "ru")
    assert "на английском языке" not in variant.text
    assert not lxml_html.document_fromstring(variant.html).xpath("//*[@class='letter'][@lang]")


def test_letter_text_is_escaped_in_html() -> None:
    """A letter is plain text: anything that looks like markup is shown, never obeyed."""
    letters = {"en": {"subject": "<b>Now</b>", "body": 'Free them <script>alert("x")</script>'}}
    variant = render_case("first", "en", letters=letters)
    tree = lxml_html.document_fromstring(variant.html)
    assert not list(tree.iter("script")) and not tree.xpath("//div[@class='letter']//b")
    assert 'Free them <script>alert("x")</script>' in visible_text(variant.html)


# --- what every message shows ----------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("role", ROLES)
def test_deadline_is_a_day_in_the_readers_language_and_zone(role: str, lang: str) -> None:
    """The deadline is written long in the reader's language, with the portal's city."""
    variant = render_case(role, lang, message_html="<p>Навіна.</p>")
    day = one_line(format_date(DEADLINE, "long", locale=lang))
    city = {"en": "Minsk", "be": "Мінск", "ru": "Минск"}[lang]
    for body in (visible_text(variant.html), one_line(variant.text)):
        assert day in body
        assert re.search(rf"{re.escape(day)} \([^)]*{city}[^)]*\)", body)


def test_no_deadline_no_deadline_line() -> None:
    """A case without a deadline says nothing about one."""
    variant = render_case("first", "en", deadline=None)
    assert "Deadline" not in visible_text(variant.html) and "Deadline" not in variant.text


@pytest.mark.parametrize(
    ("role", "number", "lang", "subject", "kicker"),
    [
        ("first", 0, "en", "UA 7/26: Free them", "UA 7/26 · Urgent action"),
        ("update", 2, "en", "UA 7/26 update 2: Free them", "UA 7/26 · Update 2"),
        ("reminder", 0, "en", "UA 7/26 reminder: Free them", "UA 7/26 · Reminder"),
        ("closing", 0, "en", "UA 7/26 closed: Free them", "UA 7/26 · Case closed"),
        ("update", 3, "be", "UA 7/26, абнаўленне 3: Free them", "UA 7/26 · Абнаўленне 3"),
        ("reminder", 0, "ru", "UA 7/26, напоминание: Free them", "UA 7/26 · Напоминание"),
        ("closing", 0, "ru", "UA 7/26, дело закрыто: Free them", "UA 7/26 · Дело закрыто"),
    ],
)
def test_subject_and_kicker_say_what_the_message_is(
    role: str, number: int, lang: str, subject: str, kicker: str
) -> None:
    """The subject and the kicker carry the reference and the message's role (and number)."""
    variant = render_case(role, lang, number=number, title="Free them", message_html="<p>x</p>")
    assert variant.subject == subject
    tree = lxml_html.document_fromstring(variant.html)
    assert [p.text_content() for p in tree.find_class("kicker")] == [kicker]
    assert kicker.upper() in variant.text
    assert [h.text_content() for h in tree.iter("h1")] == ["Free them"]


@pytest.mark.parametrize("lang", LANGS)
def test_html_declares_the_readers_language(lang: str) -> None:
    """The <html> element carries the reader's language and direction."""
    assert f'<html lang="{lang}" dir="ltr"' in render_case("first", lang).html


@pytest.mark.parametrize(
    ("public", "person_public", "shown", "hidden"),
    [
        pytest.param(True, False, "А. Б.", PERSON, id="public-copy-initials"),
        pytest.param(True, True, PERSON, "А. Б.", id="public-copy-named"),
        pytest.param(False, False, PERSON, "А. Б.", id="email-named"),
    ],
)
def test_person_is_named_only_where_they_may_be(
    public: bool, person_public: bool, shown: str, hidden: str
) -> None:
    """A public copy of a person not to be named shows initials; an email, the name."""
    variant = render_case("first", "be", public=public, person_public=person_public)
    for body in (visible_text(variant.html), variant.text):
        assert f"Пад пагрозай: {shown}" in one_line(body)
        assert hidden not in body


OUTCOMES = {
    "released": "Good news: the person at risk has been released.",
    "improved": "The situation has improved, though not everything we asked for has happened.",
    "no-change": "Sadly, the situation has not changed.",
    "no-further-action": "We are not asking for any further action on this case.",
}


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_closing_says_the_outcome_and_thanks(outcome: str) -> None:
    """The closing message shows its own text, the outcome's sentence (only) and the thanks."""
    variant = render_case(
        "closing", "en", status="closed", outcome=outcome, message_html="<p>He is home.</p>"
    )
    for body in (visible_text(variant.html), one_line(variant.text)):
        assert f"This case is closed. {OUTCOMES[outcome]}" in body
        assert [o for o in OUTCOMES if OUTCOMES[o] in body] == [outcome]
        assert "Thank you to everyone who wrote. No further action is needed on this case." in body
        assert body.index("He is home.") < body.index("About the case")


def test_closing_outcome_is_translated() -> None:
    """The outcome's sentence is in the reader's language."""
    variant = render_case("closing", "be", status="closed", outcome="released")
    assert "Добрая навіна" in visible_text(variant.html)
    assert "Добрая навіна" in variant.text


def test_open_case_says_nothing_of_an_outcome() -> None:
    """An open case's messages show no closed status."""
    variant = render_case("update", "en", number=1, message_html="<p>News.</p>")
    assert "This case is closed" not in visible_text(variant.html) + variant.text


@pytest.mark.parametrize("role", ["update", "closing"])
def test_follow_up_shows_its_message_first_then_the_case_in_short(role: str) -> None:
    """An update or the closing shows its own text, then the case in short. An update to an open
    case then gives the targets and the letter again (a reader added since can act); the closing
    neither."""
    variant = render_case(
        role, "en", number=1, message_html="<p>He was moved to another prison.</p>"
    )
    page = visible_text(variant.html)
    acts = role == "update"
    for body in (page, one_line(variant.text)):
        assert body.index("He was moved") < body.index("About the case")
        assert body.index("About the case") < body.index("асуджаны на дзесяць гадоў")
        assert (LETTERS["en"]["subject"] in body) == acts
        assert ("Who to write to" in body) == acts
    assert bool(mailto_hrefs(variant.html)) == acts
    assert "WROTE" not in variant.html + variant.text  # "I sent my letter": the first only
    assert variant.html.count("He was moved") == 2  # the preheader and the message


def test_follow_up_shortens_a_long_case() -> None:
    """The reminder of the case in an update is short: not the whole story again."""
    long_body = "<p>" + "Праваабаронца застаецца за кратамі. " * 60 + "</p>"
    first = render_case("first", "en", body_html=long_body)
    update = render_case("update", "en", number=1, message_html="<p>x</p>", body_html=long_body)
    assert visible_text(first.html).count("застаецца") >= 60
    assert 0 < visible_text(update.html).count("застаецца") < 20
    assert 0 < update.text.count("застаецца") < 20


@pytest.mark.parametrize("lang", LANGS)
def test_reminder_gives_the_deadline_targets_and_letter(lang: str) -> None:
    """The reminder says when the deadline is, then the targets and the letter as the first."""
    variant = render_case("reminder", lang)
    day = one_line(format_date(DEADLINE, "long", locale=lang))
    sentence = {
        "en": f"The deadline is {day}. If you have not written yet, there is still time.",
        "be": f"Апошні дзень — {day}. Калі вы яшчэ не напісалі, час яшчэ ёсць.",
        "ru": f"Последний день — {day}. Если вы ещё не написали, время ещё есть.",
    }[lang]
    assert sentence in visible_text(variant.html)
    assert sentence in one_line(variant.text)
    assert len(mailto_hrefs(variant.html)) == 1
    assert LETTERS[lang]["body"] in variant.text
    assert not has_link(variant, "wrote")


def test_first_message_shows_the_case_and_the_actions() -> None:
    """The first message shows the case, then what else to do, then who to write to."""
    variant = render_case("first", "en")
    page = visible_text(variant.html)
    for body in (page, one_line(variant.text)):
        assert body.index("асуджаны") < body.index("What else you can do")
        assert body.index("Падзяліцеся") < body.index("Who to write to")
        assert body.index("Who to write to") < body.index("Sample letter")


def test_first_message_without_actions_has_no_actions_heading() -> None:
    variant = render_case("first", "en", actions_html="")
    assert "What else you can do" not in visible_text(variant.html) + variant.text


# --- the "I sent my letter" section --------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "public", "expected"),
    [
        ("first", False, True),
        ("first", True, False),
        ("update", False, False),
        ("reminder", False, False),
        ("closing", False, False),
    ],
)
@pytest.mark.parametrize("lang", LANGS)
def test_wrote_section_only_in_a_readers_first_message(
    role: str, public: bool, expected: bool, lang: str
) -> None:
    """Only the first message, as emailed, carries the link, inside its section's markers."""
    variant = render_case(role, lang, public=public, message_html="<p>x</p>")
    marker = variant.markers["wrote"]
    begin, end = wrote_section(variant.nonce)
    assert has_link(variant, "wrote") is expected
    for body in (variant.html, variant.text):
        assert (body.count(marker), body.count(begin), body.count(end)) == (
            (1, 1, 1) if expected else (0, 0, 0)
        )
        if expected:
            assert body.index(begin) < body.index(marker) < body.index(end)
    assert misplaced_links(variant, expect_all=True) == []


def test_wrote_link_is_a_whole_href_and_a_word_of_its_own() -> None:
    """In the HTML the marker is an <a>'s href; in the text it has a line of its own."""
    variant = render_case("first", "en")
    marker = variant.markers["wrote"]
    tree = lxml_html.document_fromstring(variant.html)
    (link,) = (a for a in tree.iter("a") if a.get("href") == marker)
    assert link.text_content() == "I sent my letter"
    lines = variant.text.splitlines()
    assert marker in lines
    assert lines[lines.index(marker) - 1].startswith("Sent your letter?")


def test_wrote_section_explains_what_clicking_does() -> None:
    """The section: a click counts the letter once, records nothing else, spares the reminder."""
    variant = render_case("first", "en")
    begin, end = wrote_section(variant.nonce)
    for body in (variant.html, variant.text):
        section = " ".join(body[body.index(begin) : body.index(end)].split())
        assert "counts your letter once and records nothing else about you" in section
        assert "not get the reminder" in section


@pytest.mark.parametrize("lang", LANGS)
def test_without_wrote_cuts_the_section_or_only_its_markers(lang: str) -> None:
    """keep=False takes the whole section out; keep=True only its markers, the link stays."""
    variant = render_case("first", lang)
    marker = variant.markers["wrote"]
    begin, end = wrote_section(variant.nonce)
    sentence = {
        "en": "Tell us with one click",
        "be": "Паведаміце нам адным націскам",
        "ru": "Сообщите нам одним щелчком",
    }[lang]
    assert sentence in variant.html and sentence in variant.text

    cut = without_wrote(variant, keep=False)
    for body in (cut.html, cut.text):
        assert marker not in body and begin not in body and end not in body
        assert sentence not in body
    assert "\n\n\n" not in cut.text
    assert cut.text.endswith(variant.text[variant.text.index(end) + len(end) + 1 :])
    assert misplaced_links(cut, expect_all=True) == []
    assert LETTERS[lang]["body"] in cut.text  # only the section went

    kept = without_wrote(variant, keep=True)
    for body in (kept.html, kept.text):
        assert begin not in body and end not in body
        assert body.count(marker) == 1 and sentence in body
    assert f'<a href="{marker}"' in kept.html
    assert "\n\n\n" not in kept.text
    assert misplaced_links(kept, expect_all=True) == []
    assert len(kept.html) == len(variant.html) - len(begin) - len(end)


def test_personalised_wrote_link_is_the_readers() -> None:
    """personalise() puts the reader's own link where the marker was, in both parts."""
    variant = without_wrote(render_case("first", "en"), keep=True)
    wrote = "https://news.example.org/wrote/abc?case=7&t=x"
    page, text = personalise(
        variant,
        unsubscribe_url="https://news.example.org/u/abc",
        preferences_url="https://news.example.org/p/abc",
        wrote_url=wrote,
    )
    hrefs = [a.get("href") for a in lxml_html.document_fromstring(page).iter("a")]
    assert hrefs.count(wrote) == 1
    assert wrote in text.splitlines()


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("role", ROLES)
def test_no_link_is_misplaced(role: str, lang: str) -> None:
    """Every personal link stands once where the templates put it, in every message."""
    variant = render_case(role, lang, message_html="<p>x</p>")
    assert misplaced_links(variant, expect_all=True) == []
    assert f'href="{variant.markers["unsubscribe"]}"' in variant.html
    assert variant.markers["unsubscribe"] in variant.text.split()


# --- size and language -----------------------------------------------------------------------


@pytest.mark.parametrize("lang", LANGS)
def test_html_of_a_long_case_is_under_100_kb(lang: str) -> None:
    """Five email targets and a long Cyrillic letter (each link holds it all) stay under 100 KB."""
    body = "\n\n".join(["Паважаны адрасат, прашу вас вызваліць праваабаронцу неадкладна."] * 20)
    letters = {code: {"subject": "Вызваліце", "body": body} for code in LANGS}
    targets = [dict(EMAIL_TARGET, email=f"t{n}@example.by") for n in range(5)]
    variant = render_case("first", lang, letters=letters, targets=[*targets, POSTAL_TARGET])
    assert len(mailto_hrefs(variant.html)) == 5
    assert len(variant.html.encode()) < 100_000


CYRILLIC_SETTINGS = dataclasses.replace(
    Settings(),
    brand=dataclasses.replace(
        Settings().brand, name="Навіны", postal_address="Скрыня 000, Горад", footer_lines=()
    ),
)
LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


@pytest.mark.parametrize("lang", ["be", "ru"])
@pytest.mark.parametrize("role", ROLES)
def test_no_template_text_is_left_in_english(role: str, lang: str) -> None:
    """With Cyrillic content, a be/ru message shows no Latin word but the reference and address."""
    letters = {lang: LETTERS[lang]}
    variant = render_case(
        role,
        lang,
        letters=letters,
        targets=[dict(EMAIL_TARGET, language="беларуская, руская"), POSTAL_TARGET],
        status="closed" if role == "closing" else "open",
        outcome="improved" if role == "closing" else "",
        message_html="<p>Навіна.</p>",
        settings=CYRILLIC_SETTINGS,
    )
    allowed = re.compile(r"UA 7/26|" + re.escape(EMAIL) + r"|(?:https?|mailto):\S+|%%\w+%%")
    assert LATIN_WORD.findall(allowed.sub(" ", visible_text(variant.html))) == []
    assert LATIN_WORD.findall(allowed.sub(" ", variant.text)) == []
    assert LATIN_WORD.findall(allowed.sub(" ", variant.subject)) == []
