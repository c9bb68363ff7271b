"""Urgent-action cases end to end: real SQLite and PostgreSQL, a real SMTP server (aiosmtpd).

A case with two targets (one email, one postal) and letters in en/be/ru: the first message each
reader gets carries their letter and the mailto link that opens it; updates and the closing
message thread under each reader's own first message; the audience of an update; the reminder's
timing in the portal's time zone; "I sent my letter" counted once; numbers never shared.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from babel.dates import format_date
from lxml import html as lxml_html
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.case_files import parse_letter, parse_targets
from newsletter.cases import (
    CaseDraft,
    case_from_item,
    cases_for_urgent_items,
    close_case,
    create_case,
    due_reminders,
    get_case,
    record_wrote,
    reminder_due_at,
    send_due_reminders,
    send_first,
    send_update,
    wrote_count,
)
from newsletter.clock import FrozenClock
from newsletter.config import ScheduleSettings, Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ActionCase,
    Delivery,
    Item,
    MailingList,
    Subscriber,
    Subscription,
    SubscriptionStatus,
)
from newsletter.errors import CampaignError
from newsletter.lists import get_list
from newsletter.subscriptions import subscribe
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.test_flow import prepare

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
TARGETS = """
[[target]]
name = "Prosecutor General"
title = "Prosecutor General of the Republic of Belarus"
email = "info@prokuratura.example.by"
salutation = "Dear Prosecutor General,"
language = "be, ru"

[[target]]
name = "Minister of Internal Affairs"
postal = \"\"\"ul. Gorodskoj Val 4
220030 Minsk
Belarus\"\"\"
salutation = "Dear Minister,"
"""
LETTERS = {
    "en": "Subject: Release Ales Bialiatski\nI urge you to release him & drop the charges?\n"
    "At once = now.\n\nYours sincerely,",
    "be": "Subject: Вызваліце Алеся Бяляцкага\nПатрабую вызваліць яго неадкладна.\n"
    "Другі радок #1.\n\nЗ павагай,",
    "ru": "Subject: Освободите Алеся Беляцкого\nПрошу немедленно освободить его.\n"
    "Вторая строка 100%.\n\nС уважением,",
}


def case_draft(deadline: date = date(2026, 12, 20)) -> CaseDraft:
    return CaseDraft(
        title="Free Ales Bialiatski",
        body_html="<p>Ales Bialiatski, Nobel laureate, is serving ten years.</p>",
        person="Ales Bialiatski",
        person_public=False,
        deadline=deadline,
        targets=parse_targets(TARGETS, where="targets.toml"),
        letters={
            lang: parse_letter(text, where=lang, default_subject="x")
            for lang, text in LETTERS.items()
        },
    )


def make_world(
    factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer
) -> tuple[sessionmaker[Session], Settings, FrozenClock]:
    """The demo's lists and people (en, be and ru on urgent-actions), a clock, real SMTP."""
    clock = FrozenClock(START)
    prepare(factory, clock)
    return factory, make_settings(database_url, smtpd), clock


@pytest.fixture
def world(
    factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer
) -> tuple[sessionmaker[Session], Settings, FrozenClock]:
    """See make_world."""
    return make_world(factory, database_url, smtpd)


def make_case(factory: sessionmaker[Session], settings: Settings, clock: FrozenClock) -> int:
    with unit_of_work(factory) as session:
        case = create_case(
            session, settings=settings, now=clock.now(), actor="test", draft=case_draft()
        )
        return case.id


def send(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    step: str,
    case_id: int,
    **kwargs: object,
) -> int:
    """One step of the case (first, update, close), then deliver; returns the campaign id."""
    with unit_of_work(factory) as session:
        case = get_case(session, case_id)
        now = clock.now()
        if step == "first":
            campaign, _ = send_first(session, case=case, settings=settings, now=now, actor="t")
        elif step == "update":
            campaign, _ = send_update(
                session,
                case=case,
                settings=settings,
                now=now,
                actor="t",
                body_html=str(kwargs.get("body", "<p>News.</p>")),
                include_new=bool(kwargs.get("include_new", False)),
            )
        else:
            made, _ = close_case(
                session,
                case=case,
                settings=settings,
                now=now,
                actor="t",
                outcome=str(kwargs.get("outcome", "released")),
                body_html="<p>He is free.</p>",
            )
            assert made is not None
            campaign = made
        campaign_id = campaign.id
    report = deliver(factory, settings, clock)
    assert report.failed == 0
    return campaign_id


def by_campaign(smtpd: SmtpServer, campaign_id: int) -> dict[str, EmailMessage]:
    """The messages of one campaign by recipient (its Message-ID names the campaign first)."""
    out: dict[str, EmailMessage] = {}
    for msg in smtpd.messages():
        if str(msg["Message-ID"]).startswith(f"<{campaign_id}."):
            to = str(msg["To"]).rpartition("<")[2].rstrip(">") or str(msg["To"])
            assert to not in out, f"{to} got two copies"
            out[to] = msg
    return out


def people(factory: sessionmaker[Session]) -> dict[str, Subscriber]:
    with unit_of_work(factory) as session:
        return {s.email: s for s in session.scalars(select(Subscriber))}


def test_first_message_carries_each_readers_letter_mailto_and_deadline(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    first = send(factory, settings, clock, "first", case_id)
    got = by_campaign(smtpd, first)
    readers = people(factory)
    assert len(got) == 8  # everyone on urgent-actions, once each
    langs_seen = set()
    for address, msg in got.items():
        lang = readers[address].language
        langs_seen.add(lang)
        assert str(msg["Subject"]).startswith("UA 1/26")
        page = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        tree = lxml_html.fromstring(page)
        mailtos = [a.get("href") for a in tree.iter("a") if a.get("href", "").startswith("mailto:")]
        mailtos = [m for m in mailtos if "prokuratura" in m]
        assert len(set(mailtos)) == 1, mailtos  # the email target only; the postal one has none
        parts = urlsplit(mailtos[0])
        assert unquote(parts.path) == "info@prokuratura.example.by"
        query = parse_qs(parts.query, keep_blank_values=True)
        letter = parse_letter(LETTERS[lang], where=lang, default_subject="x")
        assert query["subject"] == [letter.subject]
        assert query["body"] == [
            "Dear Prosecutor General,\r\n\r\n" + letter.body.replace("\n", "\r\n")
        ]
        assert "%0D%0A" in mailtos[0] and "+" not in parts.query  # RFC 6068: CRLF, %20
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert letter.body.splitlines()[0] in text
        for line in ("ul. Gorodskoj Val 4", "220030 Minsk"):
            assert line in page and line in text
        deadline = str(format_date(date(2026, 12, 20), format="long", locale=lang))
        assert deadline in page and deadline in text
        # The reader's own "I sent my letter" link, in both parts.
        wrote = [a.get("href") for a in tree.iter("a") if "/wrote/" in a.get("href", "")]
        assert len(wrote) == 1 and wrote[0] in text
        assert "%%" not in page and "%%" not in text
    assert langs_seen == {"en", "be", "ru"}


def test_updates_and_closing_thread_under_each_readers_first_message(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    first = send(factory, settings, clock, "first", case_id)
    clock.advance(days=1)
    update1 = send(factory, settings, clock, "update", case_id)
    clock.advance(days=1)
    update2 = send(factory, settings, clock, "update", case_id, body="<p>More news.</p>")
    clock.advance(days=1)
    closing = send(factory, settings, clock, "close", case_id, outcome="released")
    firsts, ones, twos = (
        by_campaign(smtpd, first),
        by_campaign(smtpd, update1),
        by_campaign(smtpd, update2),
    )
    closes = by_campaign(smtpd, closing)
    assert set(firsts) == set(ones) == set(twos) == set(closes) and len(firsts) == 8
    for address, original in firsts.items():
        first_id = str(original["Message-ID"])
        assert str(ones[address]["In-Reply-To"]) == first_id
        assert str(ones[address]["References"]).split() == [first_id]
        one_subject, two_subject = str(ones[address]["Subject"]), str(twos[address]["Subject"])
        assert one_subject.startswith("UA 1/26") and "1:" in one_subject
        assert two_subject.startswith("UA 1/26") and "2:" in two_subject
        assert str(twos[address]["In-Reply-To"]) == first_id
        assert str(twos[address]["References"]).split() == [
            first_id,
            str(ones[address]["Message-ID"]),
        ]
        assert str(closes[address]["In-Reply-To"]) == first_id
        assert len(str(closes[address]["References"]).split()) == 3
        assert original["In-Reply-To"] is None
        # no "I sent my letter" link after the first message
        later = ones[address].get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert "/wrote/" not in later
    with unit_of_work(factory) as session:
        case = get_case(session, case_id)
        assert (case.status, case.outcome) == ("closed", "released")
        with pytest.raises(CampaignError, match="closed"):
            send_update(
                session,
                case=case,
                body_html="<p>x</p>",
                include_new=False,
                settings=settings,
                now=clock.now(),
                actor="t",
            )


def _join(factory: sessionmaker[Session], clock: FrozenClock, email: str) -> None:
    with unit_of_work(factory) as session:
        ml = get_list(session, "urgent-actions")
        subscribe(
            session=session,
            email=email,
            lists=[ml],
            secret=SECRET,
            now=clock.now(),
            actor="t",
            confirmed=True,
            language="ru",
        )


def test_update_audience_first_readers_still_subscribed_and_newcomers_only_when_asked(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    first = send(factory, settings, clock, "first", case_id)
    firsts = by_campaign(smtpd, first)
    leaver = sorted(firsts)[0]
    with unit_of_work(factory) as session:
        sub = session.scalar(select(Subscriber).where(Subscriber.email == leaver))
        assert sub is not None
        row = session.scalar(
            select(Subscription).where(
                Subscription.subscriber_id == sub.id,
                Subscription.list_id
                == select(MailingList.id)
                .where(MailingList.slug == "urgent-actions")
                .scalar_subquery(),
            )
        )
        assert row is not None
        row.status = SubscriptionStatus.UNSUBSCRIBED
    _join(factory, clock, "late.reader@example.org")
    update1 = send(factory, settings, clock, "update", case_id)
    ones = by_campaign(smtpd, update1)
    assert set(ones) == set(firsts) - {leaver}
    update2 = send(factory, settings, clock, "update", case_id, include_new=True)
    twos = by_campaign(smtpd, update2)
    assert set(twos) == (set(firsts) - {leaver}) | {"late.reader@example.org"}
    # The newcomer never got the first message: nothing to thread under.
    assert twos["late.reader@example.org"]["In-Reply-To"] is None
    with unit_of_work(factory) as session:
        counts = session.execute(
            select(Delivery.campaign_id, func.count()).group_by(Delivery.campaign_id)
        ).all()
        assert dict(counts) == {first: 8, update1: 7, update2: 8}


@pytest.mark.parametrize(
    ("zone", "deadline", "due_utc"),
    [
        # Minsk keeps UTC+3 all year (no daylight saving since 2011): 09:00 is 06:00 UTC.
        ("Europe/Minsk", date(2027, 3, 30), datetime(2027, 3, 28, 6, 0, tzinfo=UTC)),
        # Vilnius, where much of Belarusian civil society works from, springs forward on
        # 28 March 2027: 09:00 on the 28th is 06:00 UTC, on the 27th 07:00 UTC.
        ("Europe/Vilnius", date(2027, 3, 30), datetime(2027, 3, 28, 6, 0, tzinfo=UTC)),
        ("Europe/Vilnius", date(2027, 3, 29), datetime(2027, 3, 27, 7, 0, tzinfo=UTC)),
        # and falls back on 31 October 2027.
        ("Europe/Vilnius", date(2027, 11, 2), datetime(2027, 10, 31, 7, 0, tzinfo=UTC)),
    ],
)
def test_reminder_is_due_at_nine_portal_time_two_days_before_across_dst(
    zone: str, deadline: date, due_utc: datetime
) -> None:
    settings = replace(Settings(), schedule=ScheduleSettings(timezone=zone))
    assert reminder_due_at(deadline, settings=settings) == due_utc


def test_reminder_goes_once_when_due_and_spares_readers_who_wrote(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    settings = replace(settings, schedule=replace(settings.schedule, timezone="Europe/Vilnius"))
    with unit_of_work(factory) as session:
        case = create_case(
            session,
            settings=settings,
            now=clock.now(),
            actor="t",
            draft=case_draft(deadline=date(2027, 3, 30)),
        )
        case_id = case.id
    first = send(factory, settings, clock, "first", case_id)
    firsts = by_campaign(smtpd, first)
    wrote_by = sorted(firsts)[:2]
    ids = {e: s.id for e, s in people(factory).items()}
    with unit_of_work(factory) as session:
        for _ in range(3):  # the same reader three times: counted once
            record_wrote(session, case_id=case_id, subscriber_id=ids[wrote_by[0]])
        assert record_wrote(session, case_id=case_id, subscriber_id=ids[wrote_by[1]])
        assert not record_wrote(session, case_id=case_id, subscriber_id=ids[wrote_by[1]])
        assert wrote_count(session, case_id) == 2
    due = datetime(2027, 3, 28, 6, 0, tzinfo=UTC)  # 09:00 in Vilnius, after the change
    clock._at = due - timedelta(minutes=1)
    with unit_of_work(factory) as session:
        assert due_reminders(session, settings=settings, now=clock.now()) == []
        assert send_due_reminders(session, settings=settings, now=clock.now()) == []
    clock._at = due
    with unit_of_work(factory) as session:
        [reminder] = send_due_reminders(session, settings=settings, now=clock.now())
        reminder_id = reminder.id
    deliver(factory, settings, clock)
    clock.advance(hours=1)
    with unit_of_work(factory) as session:  # once only
        assert send_due_reminders(session, settings=settings, now=clock.now()) == []
    reminded = by_campaign(smtpd, reminder_id)
    assert set(reminded) == set(firsts) - set(wrote_by)
    for address, msg in reminded.items():
        assert str(msg["In-Reply-To"]) == str(firsts[address]["Message-ID"])
        assert str(msg["Subject"]).startswith("UA 1/26")
        assert str(msg["Subject"]) != str(firsts[address]["Subject"])


def test_numbers_count_per_year_and_restart_each_year(
    world: tuple[sessionmaker[Session], Settings, FrozenClock],
) -> None:
    factory, settings, _ = world
    refs = []
    for now in (START, START + timedelta(days=1), datetime(2026, 12, 31, 21, 30, tzinfo=UTC)):
        with unit_of_work(factory) as session:  # 21:30 UTC on 31 Dec is 2027 in Minsk
            refs.append(
                create_case(
                    session, settings=settings, now=now, actor="t", draft=case_draft()
                ).reference
            )
    assert refs == ["UA 1/26", "UA 2/26", "UA 1/27"]
    with unit_of_work(factory) as session:
        assert get_case(session, "UA 1/27").reference == "UA 1/27"
        assert get_case(session, "2/26").reference == "UA 2/26"
        with pytest.raises(CampaignError, match="no case"):
            get_case(session, "UA 9/26")


def test_concurrent_creation_never_gives_two_cases_one_number(
    factory: sessionmaker[Session], database_url: str
) -> None:
    clock = FrozenClock(START)
    prepare(factory, clock)
    settings = make_settings(database_url)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            barrier.wait()
            for _ in range(5):
                with unit_of_work(factory) as session:
                    create_case(
                        session, settings=settings, now=clock.now(), actor="t", draft=case_draft()
                    )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with unit_of_work(factory) as session:
        seqs = sorted(session.scalars(select(ActionCase.seq)))
    assert seqs == list(range(1, 41))


def test_urgent_item_makes_a_draft_case_held_for_staff_once(
    world: tuple[sessionmaker[Session], Settings, FrozenClock],
) -> None:
    factory, settings, clock = world
    with unit_of_work(factory) as session:
        item = session.scalars(select(Item).order_by(Item.id)).first()
        assert item is not None
        item.urgent, item.published_at = True, clock.now() - timedelta(hours=1)
    with unit_of_work(factory) as session:
        made = cases_for_urgent_items(session, settings=settings, now=clock.now())
        assert len(made) == 1 and made[0].status == "draft"
        assert cases_for_urgent_items(session, settings=settings, now=clock.now()) == []
        assert case_from_item(session, settings=settings, item=item, now=clock.now()) is None
        with pytest.raises(CampaignError, match="not ready"):  # no targets, letters, deadline
            send_first(session, case=made[0], settings=settings, now=clock.now(), actor="t")
        assert session.scalar(select(func.count()).select_from(Delivery)) == 0
    off = replace(settings, actions=replace(settings.actions, from_urgent_items=False))
    with unit_of_work(factory) as session:
        assert cases_for_urgent_items(session, settings=off, now=clock.now()) == []


def test_discreet_reader_gets_no_i_wrote_link(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    settings = replace(
        settings, discreet=replace(settings.discreet, base_url="https://neutral.example.net")
    )
    case_id = make_case(factory, settings, clock)
    readers = people(factory)
    discreet = sorted(readers)[0]
    with unit_of_work(factory) as session:
        sub = session.get(Subscriber, readers[discreet].id)
        assert sub is not None
        sub.discreet = "envelope"
    first = send(factory, settings, clock, "first", case_id)
    got = by_campaign(smtpd, first)
    for address, msg in got.items():
        raw = msg.as_string()
        assert "WROTE" not in raw
        page = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert ("/wrote/" in page) == (address != discreet)


def test_a_long_letter_to_many_targets_still_fits_and_links_carry_the_subject(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    """Five email targets and a long Cyrillic letter would make 200 KB of mailto links: the
    links then carry the subject only, the letter stays in the message, under the size limit."""
    factory, settings, clock = world
    many = "\n".join(
        f'[[target]]\nname = "Official {n}"\nemail = "official{n}@gov.example.by"\n'
        for n in range(5)
    )
    long_body = "\n\n".join("Патрабую неадкладна вызваліць палітвязняў. " * 12 for _ in range(12))
    letters = {
        lang: parse_letter(f"Subject: Ліст {lang}\n{long_body}", where=lang, default_subject="x")
        for lang in ("en", "be", "ru")
    }
    draft = replace(case_draft(), targets=parse_targets(many, where="t"), letters=letters)
    with unit_of_work(factory) as session:
        case_id = create_case(
            session, settings=settings, now=clock.now(), actor="t", draft=draft
        ).id
    first = send(factory, settings, clock, "first", case_id)
    got = by_campaign(smtpd, first)
    assert len(got) == 8
    for msg in got.values():
        page = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert len(page.encode()) < settings.check.max_html_kb * 1024
        tree = lxml_html.fromstring(page)
        mailtos = {
            a.get("href") for a in tree.iter("a") if a.get("href", "").startswith("mailto:o")
        }
        assert len(mailtos) == 5
        for link in mailtos:
            query = parse_qs(urlsplit(link).query)
            assert "body" not in query and query["subject"][0].startswith("Ліст")
        assert "Патрабую неадкладна" in page


def test_an_update_to_an_open_case_keeps_targets_and_letter_the_closing_does_not(
    world: tuple[sessionmaker[Session], Settings, FrozenClock], smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    _join(factory, clock, "late.reader@example.org")
    update = send(factory, settings, clock, "update", case_id, include_new=True)
    late = by_campaign(smtpd, update)["late.reader@example.org"]
    page = late.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert "mailto:info@prokuratura.example.by" in page and "220030 Minsk" in page
    assert "Освободите Алеся Беляцкого" in page  # their (ru) letter: they can act now
    closing = send(factory, settings, clock, "close", case_id)
    for msg in by_campaign(smtpd, closing).values():
        page = msg.get_body(("html",)).get_content()  # type: ignore[union-attr]
        assert "mailto:info@prokuratura" not in page
