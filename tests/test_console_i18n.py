"""The staff console in be and ru: every console message is translated, placeholders kept."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.frontend import parse_mapping_cfg
from babel.messages.pofile import read_po
from lxml import html as lxml_html
from sqlalchemy.orm import Session, sessionmaker

from newsletter import approvals, campaigns, compose
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.console_i18n import (
    AUTONYMS,
    CONSOLE_DOMAIN,
    console_environment,
    refusal_line,
    translate_error,
)
from newsletter.console_signin import WRONG
from newsletter.db import unit_of_work
from newsletter.errors import NewsletterError, ThrottledError
from newsletter.i18n import LOCALE_DIR, TEMPLATES_DIR
from newsletter.markdown import markdown_to_html
from newsletter.staff import add_staff, password_refusal
from newsletter.staff_auth import THROTTLED
from newsletter.test_send import clean_addresses
from tests.conftest import SmtpServer, make_settings
from tests.console_site import (
    console_settings,
    csrf_of,
    declare_lists,
    enrol_staff,
    next_code,
    serve_console,
)

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
    if context.get("error") == WRONG:  # the console passes refusals in their final language
        context = {**context, "error": refusal_line(WRONG, lang)}
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


# --- the step functions' refusals, in the console's language ---------------------------------


def raised(step: Callable[[], object]) -> NewsletterError:
    """The error a step raises (it must raise one)."""
    with pytest.raises(NewsletterError) as caught:
        step()
    return caught.value


def pure_refusals() -> dict[str, NewsletterError]:
    """Refusals of steps that need no database, each as the step raises or returns it."""
    state = approvals.ApprovalState(
        campaign_id=7, author="a@example.org", revision=None, needed=1, training=False
    )
    short = password_refusal("short", "ola@example.org")
    not_approvable = approvals.approval_refusal(
        dataclasses.replace(state, status="paused"), dataclasses.replace(ROLE, role="editor")
    )
    assert short is not None and not_approvable is not None
    return {
        "long": raised(lambda: markdown_to_html("x" * 20_001, base_url="https://example.org")),
        "many": raised(lambda: clean_addresses([f"p{i}@example.org" for i in range(6)])),
        "short": short,
        "status": not_approvable,
        "throttled": ThrottledError(90).keeping(THROTTLED, {"seconds": 90}),
    }


@dataclasses.dataclass(frozen=True)
class Approver:
    email: str
    role: str
    training: bool = False


ROLE = Approver("ed@example.org", "editor")
# Each refusal: its English line, byte for byte as before, and a word of each translation.
PURE = {
    "long": ("the text has 20,001 characters, over the limit of 20,000", "20,001", "20,001"),
    "many": ("a test goes to at most 5 addresses, not 6", "адрасоў", "адресов"),
    "short": ("the password must be at least 12 characters long", "12 сімвалаў", "12 символов"),
    "status": ("the alert is paused", "«прыпынена»", "«приостановлено»"),
    "throttled": ("too many attempts: try again in 90 seconds", "праз 90 с", "через 90 с"),
}


@pytest.mark.parametrize("name", PURE)
def test_a_refusal_is_english_for_the_cli_and_translated_for_the_console(
    name: str, console_messages: set[str]
) -> None:
    """str(error) is the English line; translate_error gives be/ru text with the values in it."""
    error = pure_refusals()[name]
    english, be, ru = PURE[name]
    assert str(error) == english == translate_error(error, "en")
    assert error.template in console_messages  # extracted, so the catalogues must have it
    for lang, word in (("be", be), ("ru", ru)):
        text = translate_error(error, lang)
        assert word in text and not LATIN_WORD.search(text.replace(word, "")), text


def test_an_error_without_a_translatable_form_shows_as_it_is() -> None:
    """An error made the old way (or any exception) falls back to its own line."""
    assert translate_error(NewsletterError("plain <b>line</b>"), "be") == "plain <b>line</b>"
    assert translate_error(ValueError("bug"), "ru") == "bug"
    assert (
        refusal_line(NewsletterError("plain <b>line</b>"), "be") == "plain &lt;b&gt;line&lt;/b&gt;"
    )
    assert refusal_line(WRONG, "be") == "Няправільны адрас электроннай пошты, пароль або код."


def test_the_throttled_line_is_the_one_errors_py_makes() -> None:
    """staff_auth.THROTTLED (translatable) and ThrottledError's own line say the same."""
    assert str(ThrottledError(45)) == THROTTLED % {"seconds": 45}


def alert_draft(**texts: compose.LanguageText) -> compose.DraftInput:
    """A text draft for the alert list."""
    return compose.DraftInput(list_slug="urgent-actions", segment=None, item_ref=None, texts=texts)


def test_refusals_of_steps_on_the_database_in_be_and_ru(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A draft refused by compose, an approval refused (its reason nested), a pause refused."""
    settings = Settings()
    declare_lists(factory)
    title = compose.LanguageText("Free them", "Write *today*.")
    with unit_of_work(factory) as session:
        no_title = raised(lambda: compose.create_draft(
            session, draft=alert_draft(en=title, be=compose.LanguageText("", "Пішыце.")),
            settings=settings, now=clock.now(), actor="ed@example.org",
        ))  # fmt: skip
    with unit_of_work(factory) as session:
        cid = compose.create_draft(
            session, draft=alert_draft(en=title), settings=settings, now=clock.now(),
            actor="ed@example.org",
        ).id  # fmt: skip
    with unit_of_work(factory) as session:
        unsubmitted = raised(lambda: approvals.approve(
            session, campaign_id=cid, revision_hash="x", approver=Approver("ap@example.org",
            "approver"), settings=settings, now=clock.now(),
        ))  # fmt: skip
        draft = raised(lambda: campaigns.pause_campaign(
            session=session, campaign_id=cid, now=clock.now(), actor="ed@example.org", reason="",
        ))  # fmt: skip
    assert str(no_title) == "the be text has no title"
    assert translate_error(no_title, "be") == "у тэксце на мове be няма загалоўка"
    assert str(unsubmitted) == (
        f"alert {cid} cannot be approved: "
        "the alert has not been submitted for approval (or was edited since)"
    )
    assert translate_error(unsubmitted, "ru") == (
        f"сообщение {cid} нельзя утвердить: "
        "сообщение не подано на утверждение (или было изменено после этого)"
    )
    assert str(draft) == f"campaign {cid} is draft, not running"
    assert translate_error(draft, "be") == f"кампанія {cid} у стане «чарнавік», а не «адпраўляецца»"


# --- refusals on the console's pages ----------------------------------------------------------


def test_an_enrolment_refusal_shows_in_belarusian(
    factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer, clock: FrozenClock
) -> None:
    """Two different passwords on /enrol/...?lang=be: the step's refusal, in Belarusian."""
    settings = console_settings(make_settings(database_url, smtpd))
    with serve_console(settings, factory, clock) as site:
        with unit_of_work(factory) as session:
            url = add_staff(session, email="new@example.org", role="editor", name="",
                            now=clock.now(), actor="cli:test", settings=site.settings)  # fmt: skip
        path = "/enrol/" + url.rsplit("/enrol/", 1)[1]
        browser = site.client()
        page = browser.get(path + "?lang=be").text
        secret = page.split('<code id="secret" class="secret">')[1].split("<")[0]
        form = {"password": "correct horse battery staple 42",
                "password_again": "correct horse battery staple 43",
                "code": next_code(secret, clock), "csrf": csrf_of(page)}  # fmt: skip
        refused = browser.post(path, form)
    assert refused.status_code == 400
    assert '<html lang="be">' in refused.text and "паролі не супадаюць" in refused.text
    assert "the two passwords" not in refused.text


def test_a_step_refusal_page_is_in_russian_and_typed_text_stays_text(
    factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer, clock: FrozenClock
) -> None:
    """Pausing a draft (the 409 page) in Russian; a hostile test address is shown escaped."""
    settings = console_settings(make_settings(database_url, smtpd))
    declare_lists(factory)
    editor = enrol_staff(factory, settings, clock, "ed@example.org", "editor")
    with unit_of_work(factory) as session:
        cid = compose.create_draft(
            session, draft=alert_draft(en=compose.LanguageText("Free them", "Write.")),
            settings=settings, now=clock.now(), actor=editor.email,
        ).id  # fmt: skip
    with serve_console(settings, factory, clock) as site:
        client = site.client()
        client.get("/signin?lang=ru")
        client.sign_in(editor)
        paused = client.post(f"/campaigns/{cid}/pause", {"reason": ""})
        hostile = client.post(
            f"/alerts/{cid}/test", {"addresses": "<b>bold</b>"}, csrf_from=f"/alerts/{cid}"
        )
        # A refusal quoting typed text with "%" in it (gettext's formatting must not see it).
        percent = client.post(
            f"/alerts/{cid}/test", {"addresses": "%(x)s%d"}, csrf_from=f"/alerts/{cid}"
        )
    assert paused.status_code == 409 and '<html lang="ru">' in paused.text
    assert f"кампания {cid} в статусе «черновик», а не «отправляется»" in paused.text
    assert hostile.status_code == 400 and "это не адрес электронной почты" in hostile.text
    assert "<b>bold</b>" not in hostile.text and "&lt;b&gt;bold&lt;/b&gt;" in hostile.text
    assert percent.status_code == 400 and "%(x)s%d" in percent.text
