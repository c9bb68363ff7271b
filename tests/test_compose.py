"""Console drafts: per-language text with the default language's marked where one is missing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert
from newsletter.check import check_campaign, stored_variants
from newsletter.clock import FrozenClock
from newsletter.compose import (
    DraftInput,
    LanguageText,
    console_drafts,
    create_draft,
    draft_input,
    recent_items,
    recipients_by_language,
    update_draft,
)
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Event, Item, Source, Variant
from newsletter.errors import CampaignError
from tests.conftest import make_settings
from tests.test_approvals import ALERTS, AUTHOR, seed_people, text_draft

EN = LanguageText("T", "b")


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


def variants_of(
    factory: sessionmaker[Session], settings: Settings, draft: DraftInput, clock: FrozenClock
) -> dict[str, Variant]:
    with unit_of_work(factory) as session:
        campaign = create_draft(
            session, draft=draft, settings=settings, now=clock.now(), actor=AUTHOR.email
        )
        assert check_campaign(session, campaign, settings) == []
        return {v.lang: v for v in stored_variants(session, campaign)}  # type: ignore[misc]


def test_each_language_gets_its_text_and_a_missing_one_the_default_marked(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    draft = text_draft(
        "Write to Ales today", be=LanguageText("Напішыце Алесю сёння", "Калі ласка, **пішыце**.")
    )
    got = variants_of(factory, settings, draft, clock)
    assert "Напішыце Алесю сёння" in got["be"].subject
    assert "Калі ласка" in got["be"].html and "<strong>пішыце</strong>" in got["be"].html
    assert "in English" not in got["be"].text and "па-англійску" not in got["be"].text.lower()
    # Russian has no text: the English one, marked as digests mark an English item.
    assert "Write to Ales today" in got["ru"].subject
    assert "на английском" in got["ru"].text
    assert 'lang="en"' in got["ru"].html and "на английском" in got["ru"].html
    assert "Write to Ales today" in got["en"].subject
    assert "in English" not in got["en"].text


def test_an_alert_from_the_cli_keeps_todays_look(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session, list_slug=ALERTS, now=clock.now(), actor="cli",
            title="One language", body_html="<p>Body</p>", url="https://portal.example.org/a",
        )  # fmt: skip
        check_campaign(session, campaign, settings)
        ru = {v.lang: v for v in stored_variants(session, campaign)}["ru"]
        assert "на английском" not in ru.text


def test_console_drafts_of_the_same_text_are_two_and_the_cli_still_dedupes(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    with unit_of_work(factory) as session:
        one = create_draft(
            session, draft=text_draft(), settings=settings, now=clock.now(), actor="a"
        )
        two = create_draft(
            session, draft=text_draft(), settings=settings, now=clock.now(), actor="a"
        )
        assert one.id != two.id and one.dedupe_key != two.dedupe_key
        assert ":draft:" in one.dedupe_key
        kw = {"session": session, "list_slug": ALERTS, "now": clock.now(), "actor": "cli",
              "title": "T", "body_html": "<p>b</p>"}  # fmt: skip
        first, created = assemble_alert(**kw)  # type: ignore[arg-type]
        again, created_again = assemble_alert(**kw)  # type: ignore[arg-type]
        assert created and not created_again and first.id == again.id
        assert [c.id for c in console_drafts(session)] == [first.id, two.id, one.id]


def test_the_form_comes_back_as_written_and_an_edit_is_audited(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    draft = text_draft(ru=LanguageText("Пишите", "Текст *с* разметкой"))
    with unit_of_work(factory) as session:
        campaign = create_draft(
            session, draft=draft, settings=settings, now=clock.now(), actor=AUTHOR.email
        )
        assert draft_input(campaign) == draft
        assert campaign.translations["ru"]["body_html"] == "<p>Текст <em>с</em> разметкой</p>"
        changed = text_draft("New title")
        update_draft(
            session, campaign_id=campaign.id, draft=changed, settings=settings,
            now=clock.now(), actor=AUTHOR.email,
        )  # fmt: skip
        assert draft_input(campaign) == changed and campaign.translations == {}
        actions = [e.action for e in session.scalars(select(Event).order_by(Event.id))]
        assert actions[-2:] == ["alert.drafted", "alert.edited"]


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        (DraftInput(ALERTS, None, None, {"be": LanguageText("T", "b")}), "a title in en"),
        (DraftInput(ALERTS, None, None, {"en": LanguageText("", "body only")}), "no title"),
        (DraftInput(ALERTS, None, None, {"en": EN, "xx": EN}), "no such language"),
        (DraftInput(ALERTS, None, None, {"en": EN}, url="javascript:alert(1)"), "http or https"),
        (DraftInput(ALERTS, None, None, {"en": LanguageText("T", "x" * 30_000)}), "over the limit"),
        (DraftInput(ALERTS, None, "no-such-item", {}), "no ingested item"),
    ],
)  # fmt: skip
def test_bad_drafts_are_refused_in_one_line(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    draft: DraftInput,
    message: str,
) -> None:
    seed_people(factory, clock, 1)
    with pytest.raises(CampaignError, match=message) as info, unit_of_work(factory) as session:
        create_draft(session, draft=draft, settings=settings, now=clock.now(), actor="a")
    assert "\n" not in str(info.value)
    with unit_of_work(factory) as session:
        assert session.scalars(select(Campaign)).all() == []


def test_script_in_staff_text_is_sanitised_in_the_email(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    hostile = "<script>alert(1)</script> [x](javascript:alert(1)) <b onclick=x>y</b>"
    draft = text_draft("<script>t</script>Title", be=LanguageText("Загаловак", hostile))
    with unit_of_work(factory) as session:
        campaign = create_draft(session, draft=draft, settings=settings, now=clock.now(), actor="a")
        assert check_campaign(session, campaign, settings) == []
        for v in stored_variants(session, campaign):
            assert "<script" not in v.html and 'href="javascript' not in v.html
            assert "<b onclick" not in v.html and "<script" not in v.subject


def test_recipients_by_language_and_an_item_picker(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 7, ("en", "be", "ru", "de"))
    with unit_of_work(factory) as session:
        counts = recipients_by_language(
            session, list_slug=ALERTS, segment=None, languages=("en", "be", "ru")
        )
        assert counts == {"en": 3, "be": 2, "ru": 2}  # "de" readers get the default (en) variant
        source = Source(url="https://portal.example.org/feed", lang="en")
        session.add(source)
        session.flush()
        for i, title in enumerate(["Trial of Ales", "Letters 100%_done", "Other news"]):
            session.add(
                Item(
                    source_id=source.id, guid=f"g{i}", link=f"https://portal.example.org/{i}",
                    title=title, published_at=clock.now() + timedelta(hours=i),
                    content_hash=str(i), ingested_at=clock.now(), updated_at=clock.now(),
                )
            )  # fmt: skip
        session.flush()
        assert [i.title for i in recent_items(session, query="")] == [
            "Other news", "Letters 100%_done", "Trial of Ales",
        ]  # fmt: skip
        assert [i.title for i in recent_items(session, query="  TRIAL ")] == ["Trial of Ales"]
        assert [i.title for i in recent_items(session, query="%_")] == ["Letters 100%_done"]
        assert recent_items(session, query="_") != recent_items(session, query="")
        item_draft = DraftInput(ALERTS, None, "g0", {})
        campaign = create_draft(
            session, draft=item_draft, settings=settings, now=clock.now(), actor="a"
        )
        assert campaign.items[0].guid == "g0" and draft_input(campaign).item_ref == "g0"


def test_an_edit_keeps_the_drafts_item_when_another_item_takes_its_guid(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    """The form gives the item back by its guid; once another source's item has that guid as
    its link, the guid names two items: the edit keeps the draft's own, a new draft is refused."""
    seed_people(factory, clock, 1)
    with unit_of_work(factory) as session:
        portal, other = (Source(url=f"https://{h}.example.org/feed", lang="en") for h in "po")
        session.add_all([portal, other])
        session.flush()
        for source, guid, link in (
            (portal, "g0", "https://portal.example.org/0"),
            (other, "x", "g0"),
        ):
            session.add(
                Item(
                    source_id=source.id, guid=guid, link=link, title=f"from {guid}",
                    published_at=clock.now(), content_hash=guid, ingested_at=clock.now(),
                    updated_at=clock.now(),
                )
            )  # fmt: skip
        session.flush()
        draft = DraftInput(ALERTS, None, "g0", {})
        with pytest.raises(CampaignError, match="matches 2 items"):
            create_draft(session, draft=draft, settings=settings, now=clock.now(), actor="a")
        own = session.scalars(select(Item).where(Item.guid == "g0")).one()
        campaign = create_draft(
            session, draft=text_draft("T"), settings=settings, now=clock.now(), actor="a"
        )
        campaign.items = [own]
        campaign.title, campaign.source_text = "", {}
        session.flush()
        update_draft(
            session, campaign_id=campaign.id, draft=draft_input(campaign), settings=settings,
            now=clock.now(), actor="a",
        )  # fmt: skip
        assert [i.title for i in campaign.items] == ["from g0"]
