"""Urgent-action cases at their edges: hostile items and files, timing, privacy, late readers.

Each test here stands for a way the first version failed an adversarial review: a feed item that
stopped the scheduler, a private name published through the letter, an update that never
reached readers whose first message was still on its way, a reminder a minute after the first
message, an "I wrote" kept after its reader was forgotten.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from newsletter.case_files import parse_letter, parse_targets
from newsletter.cases import (
    CaseDraft,
    create_case,
    due_reminders,
    edit_case,
    get_case,
    record_wrote,
    send_due_reminders,
    send_first,
    send_reminder,
    send_update,
    wrote_count,
)
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ActionCase,
    Campaign,
    CaseLetter,
    CaseMessage,
    Delivery,
    DeliveryStatus,
    Item,
)
from newsletter.errors import CampaignError
from newsletter.message import Recipient, thread_headers
from newsletter.readers import set_reading
from newsletter.schedule import Scheduler
from newsletter.subscriptions import forget
from tests.builders import deliver
from tests.conftest import SECRET, SmtpServer
from tests.test_cases import (
    _join,
    by_campaign,
    case_draft,
    make_case,
    make_world,
    people,
    send,
)

World = tuple[sessionmaker[Session], Settings, FrozenClock]


@pytest.fixture
def world(factory: sessionmaker[Session], database_url: str, smtpd: SmtpServer) -> World:
    """The demo's lists and people, a clock, real SMTP (tests/test_cases.py)."""
    return make_world(factory, database_url, smtpd)


def _urgent(factory: sessionmaker[Session], clock: FrozenClock, n: int, **fields: str) -> int:
    with unit_of_work(factory) as session:
        item = session.scalars(select(Item).order_by(Item.id).offset(n)).first()
        assert item is not None
        item.urgent, item.published_at = True, clock.now() - timedelta(hours=1)
        for key, value in fields.items():
            setattr(item, key, value)
        return item.id


def test_hostile_urgent_items_neither_stop_the_poll_nor_the_other_items(world: World) -> None:
    """An urgent item whose title cleans to nothing gets a stand-in title; one whose HTML nests
    too deep makes no case (a log line); the other urgent item still gets its draft, and the
    poll goes on to the reminders."""
    factory, settings, clock = world
    empty = _urgent(factory, clock, 0, title="<script>x</script>")
    _urgent(factory, clock, 1, summary_html="<blockquote>" * 150 + "x" + "</blockquote>" * 150)
    good = _urgent(factory, clock, 2)
    scheduler = Scheduler(factory=factory, settings=settings, clock=clock, holder="a")
    made = scheduler.make_cases()
    assert len(made) == 2
    with unit_of_work(factory) as session:
        cases = {c.item_id: c for c in session.scalars(select(ActionCase))}
        assert set(cases) == {empty, good}
        assert cases[empty].title == f"Urgent item {empty}"
    assert scheduler.make_cases() == []  # once per item
    assert scheduler.send_reminders() == []


def test_a_private_persons_public_copies_carry_no_letter_the_emails_do(
    world: World, smtpd: SmtpServer
) -> None:
    """Letters name the person in every grammatical case: a public copy has none (nor the
    mailto links made of them); the email each reader gets has their letter."""
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)  # person_public False, letters name him
    first = send(factory, settings, clock, "first", case_id)
    with unit_of_work(factory) as session:
        message = session.get(CaseMessage, first)
        assert message is not None
        copies = dict(message.copies)
    assert set(copies) == {"en", "be", "ru"}
    for html in copies.values():
        for name in ("Release Ales", "Алеся Бяляцкага", "Алеся Беляцкого", "mailto:"):
            assert name not in html
        assert "A. B." in html and "220030 Minsk" in html  # who to write to stays
    page = next(iter(by_campaign(smtpd, first).values())).get_body(("html",))
    assert page is not None and "mailto:info@prokuratura" in str(page.get_content())


def test_an_update_made_while_first_messages_are_queued_waits_for_them(
    world: World, smtpd: SmtpServer
) -> None:
    """Queued (not sent) first messages, then an update at once: the update goes to them too,
    after their first message, threaded under it."""
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        first, queued = send_first(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
        update_campaign, update_queued = send_update(
            session,
            case=get_case(session, case_id),
            body_html="<p>A correction.</p>",
            include_new=False,
            settings=settings,
            now=clock.now(),
            actor="t",
        )
        first_id, update_id = first.id, update_campaign.id
    assert queued == update_queued == 8
    deliver(factory, settings, clock)
    clock.advance(minutes=6)
    deliver(factory, settings, clock)
    firsts, updates = by_campaign(smtpd, first_id), by_campaign(smtpd, update_id)
    assert set(updates) == set(firsts) and len(firsts) == 8
    for address, msg in updates.items():
        assert str(msg["In-Reply-To"]) == str(firsts[address]["Message-ID"])
    arrival = [str(m["Message-ID"]).split(".")[0] for m in smtpd.messages()]
    assert arrival.index(f"<{update_id}") > arrival.index(f"<{first_id}")


def test_a_reader_whose_first_message_was_deferred_gets_the_update_after_it(
    world: World, smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    first_id = send(factory, settings, clock, "first", case_id)
    victim = sorted(by_campaign(smtpd, first_id))[0]
    sid = people(factory)[victim].id
    with unit_of_work(factory) as session:  # as the sender leaves a greylisted first message
        session.execute(
            update(Delivery)
            .where(Delivery.campaign_id == first_id, Delivery.subscriber_id == sid)
            .values(
                status=DeliveryStatus.DEFERRED,
                sent_at=None,
                next_attempt_at=clock.now() + timedelta(minutes=30),
            )
        )
        session.execute(update(Campaign).where(Campaign.id == first_id).values(status="running"))
    before = len([m for m in smtpd.messages() if str(m["To"]).endswith(f"{victim}>")])
    update_id = send(factory, settings, clock, "update", case_id)
    assert victim not in by_campaign(smtpd, update_id)  # waits for its first message
    clock.advance(minutes=31)
    deliver(factory, settings, clock)  # the retried first message
    clock.advance(minutes=6)
    deliver(factory, settings, clock)  # then the update
    assert victim in by_campaign(smtpd, update_id)
    mine = [m for m in smtpd.messages() if str(m["To"]).endswith(f"{victim}>")]
    assert len(mine) == before + 2


def test_newcomers_brought_in_by_an_update_get_the_reminder_and_the_closing(
    world: World, smtpd: SmtpServer
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    _join(factory, clock, "late.reader@example.org")
    send(factory, settings, clock, "update", case_id, include_new=True)
    with unit_of_work(factory) as session:
        reminder, _ = send_reminder(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(), actor="t"
        )
        reminder_id = reminder.id
    deliver(factory, settings, clock)
    closing = send(factory, settings, clock, "close", case_id)
    assert "late.reader@example.org" in by_campaign(smtpd, reminder_id)
    closes = by_campaign(smtpd, closing)
    assert "late.reader@example.org" in closes and len(closes) == 9
    late = closes["late.reader@example.org"]
    assert late["In-Reply-To"] is not None  # under the update they got


def test_no_reminder_minutes_after_a_first_message_sent_late(world: World) -> None:
    """A case sent a day before its deadline: its readers have just been asked; no reminder."""
    factory, settings, clock = world
    clock._at = datetime(2026, 12, 18, 10, 0, tzinfo=UTC)  # 13:00 in Minsk
    with unit_of_work(factory) as session:
        case = create_case(
            session,
            settings=settings,
            now=clock.now(),
            actor="t",
            draft=case_draft(deadline=date(2026, 12, 19)),
        )
        send_first(session, case=case, settings=settings, now=clock.now(), actor="t")
    clock.advance(minutes=1)
    with unit_of_work(factory) as session:
        assert due_reminders(session, settings=settings, now=clock.now()) == []
        assert send_due_reminders(session, settings=settings, now=clock.now()) == []


def test_no_reminder_after_the_deadline_and_no_deadline_moved_into_the_past(world: World) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)  # deadline 20 Dec 2026
    send(factory, settings, clock, "first", case_id)
    with unit_of_work(factory) as session:
        case = get_case(session, case_id)
        with pytest.raises(CampaignError, match="has passed"):
            edit_case(
                session,
                case=case,
                settings=settings,
                now=clock.now(),
                actor="t",
                draft=CaseDraft(deadline=date(2026, 11, 1)),
            )
    clock._at = datetime(2026, 12, 21, 9, 0, tzinfo=UTC)
    with unit_of_work(factory) as session, pytest.raises(CampaignError, match="has passed"):
        send_reminder(
            session, case=get_case(session, case_id), settings=settings, now=clock.now(),
            actor="t",
        )  # fmt: skip


def test_forgetting_a_reader_or_their_going_discreet_keeps_the_count_not_the_row(
    world: World,
) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    readers = people(factory)
    one, two = sorted(readers)[:2]
    with unit_of_work(factory) as session:
        assert record_wrote(session, case_id=case_id, subscriber_id=readers[one].id)
        assert record_wrote(session, case_id=case_id, subscriber_id=readers[two].id)
    with unit_of_work(factory) as session:
        forget(session=session, email=one, secret=SECRET, now=clock.now(), actor="t")
        set_reading(
            session, subscriber_id=readers[two].id, discreet="envelope", now=clock.now(), actor="t"
        )
    with unit_of_work(factory) as session:
        assert session.scalars(select(CaseLetter)).all() == []
        assert wrote_count(session, case_id) == 2


def test_closing_keeps_the_count_and_no_reader_rows_and_counts_nothing_more(world: World) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    ids = [p.id for p in people(factory).values()]
    with unit_of_work(factory) as session:
        record_wrote(session, case_id=case_id, subscriber_id=ids[0])
    send(factory, settings, clock, "close", case_id)
    with unit_of_work(factory) as session:
        assert session.scalars(select(CaseLetter)).all() == []
        assert not record_wrote(session, case_id=case_id, subscriber_id=ids[1])
        assert wrote_count(session, case_id) == 1


def test_an_empty_update_is_refused(world: World) -> None:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    for body in ("<p></p>", "<p>&nbsp;</p>", "\u200b", "<p> <br> </p>"):
        with unit_of_work(factory) as session, pytest.raises(CampaignError, match="needs text"):
            send_update(
                session,
                case=get_case(session, case_id),
                body_html=body,
                include_new=False,
                settings=settings,
                now=clock.now(),
                actor="t",
            )


def test_a_case_kept_out_of_the_archive_has_no_public_message(world: World) -> None:
    factory, settings, clock = world
    with unit_of_work(factory) as session:
        case_id = create_case(
            session,
            settings=settings,
            now=clock.now(),
            actor="t",
            draft=replace(case_draft(), archived=False),
        ).id
    first = send(factory, settings, clock, "first", case_id)
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, first)
        assert campaign is not None and campaign.archived is False


@pytest.mark.parametrize(
    ("ref", "found"),
    [
        ("1", True),
        ("UA 1/26", True),
        ("ua 1/26", True),
        ("1/26", True),
        ("  UA   1/26 ", True),
        ("XX 1/26", False),
        ("UA 1/27", False),
        ("١", False),
        ("²", False),
        ("9" * 30, False),
        ("-1", False),
        ("UA 01/26", True),
    ],
)
def test_cases_are_found_by_id_or_number_and_nothing_else(
    world: World, ref: str, found: bool
) -> None:
    factory, settings, clock = world
    make_case(factory, settings, clock)
    with unit_of_work(factory) as session:
        if found:
            assert get_case(session, ref).reference == "UA 1/26"
        else:
            with pytest.raises(CampaignError, match="no case"):
                get_case(session, ref)


def test_references_stay_folded_and_short_however_long_the_thread() -> None:
    recipient = Recipient(7, "a@example.org", "", tuple(range(1, 40)))
    headers = thread_headers(recipient, secret=SECRET, domain="portal.example.org")
    lines = headers.split("\r\n")
    assert max(len(line) for line in lines) < 100
    refs = headers.partition("References: ")[2].split()
    assert len(refs) == 12 and refs[0].startswith("<1.7.") and refs[-1].startswith("<39.7.")
    assert "In-Reply-To: <1.7." in headers


def test_case_files_read_as_people_write_them() -> None:
    """A byte order mark, plain-text angle brackets and ampersands, arrays nested too deep."""
    letter = parse_letter(
        "\ufeffSubject: Re: <UA 1/26> & more\nText", where="l", default_subject="x"
    )
    assert letter.subject == "Re: <UA 1/26> & more" and letter.body == "Text"
    [target] = parse_targets(
        '[[target]]\nname = "Minister <of> Justice"\nsalutation = "Dear Sir <or Madam>,"\n'
        'postal = "PO Box 1 & 2"\n',
        where="t",
    )
    assert (target.name, target.salutation) == ("Minister <of> Justice", "Dear Sir <or Madam>,")
    assert target.postal == "PO Box 1 & 2"
    with pytest.raises(CampaignError, match=r"nested too deep|not valid TOML"):
        parse_targets("x = " + "[" * 5000 + "]" * 5000, where="t")


def test_a_case_text_nested_too_deep_is_refused_when_given(world: World) -> None:
    factory, settings, clock = world
    deep = "<blockquote>" * 150 + "x" + "</blockquote>" * 150
    with unit_of_work(factory) as session, pytest.raises(CampaignError, match="nests"):
        create_case(
            session,
            settings=settings,
            now=clock.now(),
            actor="t",
            draft=replace(case_draft(), body_html=deep),
        )
