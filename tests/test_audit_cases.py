"""Adversarial review of urgent-action cases: hostile case files, "I wrote" races, the archive.

Each test is an attack that once worked, and what happens now.
"""

from __future__ import annotations

import os
import threading
from datetime import date
from pathlib import Path

import pytest
from babel.dates import format_date
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.case_files import MAX_FILE_BYTES, parse_letter
from newsletter.cases import (
    CaseDraft,
    close_case,
    edit_case,
    get_case,
    record_wrote,
    send_first,
    wrote_count,
)
from newsletter.cli.actions import _read_text
from newsletter.db import unit_of_work
from newsletter.db.models import (
    ActionCase,
    Campaign,
    CaseLetter,
    CaseMessage,
    Delivery,
    Subscriber,
)
from newsletter.errors import CampaignError
from newsletter.readers import set_reading
from newsletter.subscriptions import forget
from tests.conftest import SECRET
from tests.test_case_render import LETTERS, render_case
from tests.test_cases import make_case, people, send
from tests.test_cases_edges import World, world

__all__ = ["world"]  # the fixture, shared with test_cases_edges


# --- hostile case files ------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["\ufffe", "\uffff"])
def test_a_letter_with_a_noncharacter_is_cleaned_and_the_case_still_renders(char: str) -> None:
    """Attack: a letter file carrying U+FFFE or U+FFFF (MJML refuses them). Before, the file was
    taken and every message of the case failed to render at send time; now the characters are
    dropped like the other invisible ones, and the message renders with the letter in it."""
    letter = parse_letter(
        f"Subject: Free{char} him\n\nDear{char} sir,\n\nRelease him.", where="l", default_subject=""
    )
    assert char not in letter.subject + letter.body
    assert letter.body == "Dear sir,\n\nRelease him."
    letters = dict(LETTERS) | {"en": {"subject": letter.subject, "body": letter.body}}
    rendered = render_case("first", "en", letters=letters)
    assert "Release him." in rendered.html and "Release him." in rendered.text


# --- "I sent my letter" against closing ----------------------------------------------------------


def _sent_case(world: World) -> tuple[int, list[int]]:
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    send(factory, settings, clock, "first", case_id)
    return case_id, sorted(p.id for p in people(factory).values())


def _close(world: World, case_id: int) -> None:
    factory, settings, clock = world
    with unit_of_work(factory) as session:
        close_case(
            session,
            case=get_case(session, case_id),
            outcome="released",
            body_html="<p>He is free.</p>",
            settings=settings,
            now=clock.now(),
            actor="t",
        )


def _rows(factory: sessionmaker[Session]) -> int:
    with unit_of_work(factory) as session:
        return int(session.scalar(select(func.count()).select_from(CaseLetter)) or 0)


def test_a_click_read_before_the_case_closed_keeps_no_row_after_it(world: World) -> None:
    """Attack: a reader's page read the case while it was open (as /wrote/ does), staff closed
    it meanwhile, then the click counted. Before, the session's stale copy of the case said
    "open", so a reader's row was written after the closing had deleted them all and kept for
    good (README: once the case closes, every reader loses their row); now the insert itself reads
    the status from the database (on PostgreSQL under a lock), and nothing is recorded."""
    factory, _, _ = world
    case_id, ids = _sent_case(world)
    with unit_of_work(factory) as page:
        seen = page.get(ActionCase, case_id)
        assert seen is not None and seen.status != "closed"
        _close(world, case_id)
        assert not record_wrote(page, case_id=case_id, subscriber_id=ids[0])
    assert _rows(factory) == 0
    with unit_of_work(factory) as session:
        assert wrote_count(session, case_id) == 0


# --- a case edited after it was sent -----------------------------------------------------------


def test_a_moved_deadline_is_the_only_one_its_web_copies_show(world: World) -> None:
    """Attack: staff move an open case's deadline (`actions edit --deadline`). Before, the web
    copies kept the old day in their text, under a box giving the new one, so a reader of the
    archive saw two deadlines and might stop writing a week early; now every copy of the case
    is rendered again with the new deadline (the emails already sent stay as they went)."""
    factory, settings, clock = world
    case_id, _ = _sent_case(world)
    old, new = date(2026, 12, 20), date(2026, 12, 27)
    with unit_of_work(factory) as session:
        case = get_case(session, case_id)
        assert case.deadline == old
        edit_case(
            session,
            case=case,
            settings=settings,
            now=clock.now(),
            actor="t",
            draft=CaseDraft(deadline=new),
        )
    with unit_of_work(factory) as session:
        [message] = session.scalars(select(CaseMessage)).all()
        assert sorted(message.copies) == ["be", "en", "ru"]
        for lang, html in message.copies.items():
            assert format_date(new, format="long", locale=lang) in html
            assert format_date(old, format="long", locale=lang) not in html


# --- the same case sent twice at once ----------------------------------------------------------


def test_two_staff_sending_a_case_at_once_send_it_once_without_an_error(world: World) -> None:
    """Attack: two staff run `actions send` for the same case at the same moment. Before, both
    looked for its first message, found none, made one each, and the second failed on the
    unique key with an internal error; now the second waits for the first, takes the message
    it made, and queues nobody twice."""
    factory, settings, clock = world
    case_id = make_case(factory, settings, clock)
    failed: list[BaseException] = []
    second: list[tuple[int, int]] = []

    def other_staff() -> None:
        try:
            with unit_of_work(factory) as session:
                campaign, queued = send_first(
                    session,
                    case=get_case(session, case_id),
                    settings=settings,
                    now=clock.now(),
                    actor="b",
                )
                second.append((campaign.id, queued))
        except BaseException as e:  # reported below, in the test's own thread
            failed.append(e)

    first = factory()
    try:
        campaign, queued = send_first(
            first, case=get_case(first, case_id), settings=settings, now=clock.now(), actor="a"
        )
        assert queued > 0
        staff = threading.Thread(target=other_staff)
        staff.start()
        staff.join(timeout=3)  # it waits for this transaction (or, before, read nothing yet)
        first.commit()
        first_id = campaign.id
    finally:
        first.close()
    staff.join(timeout=60)
    assert not staff.is_alive() and not failed, failed
    assert second == [(first_id, 0)]
    with unit_of_work(factory) as session:
        keys = session.scalars(select(Campaign.dedupe_key).where(Campaign.kind == "alert")).all()
        assert keys == [f"case:{case_id}:first:0"]
        sent = select(func.count()).select_from(Delivery).where(Delivery.campaign_id == first_id)
        assert session.scalar(sent) == queued


# --- a case file that never ends ---------------------------------------------------------------


def test_a_case_file_that_never_ends_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    """Attack: `--target-file` or `--letter` naming something endless (a pipe, a device, a huge
    file). Before, the whole of it was read into memory before the size check: a pipe held the
    command forever, a huge file filled memory; now no more than a case file's limit is read,
    and the answer is one line."""
    pipe = tmp_path / "targets.toml"
    os.mkfifo(pipe)
    outcome: list[BaseException | str] = []

    def staff() -> None:
        try:
            outcome.append(_read_text(pipe))
        except BaseException as e:  # reported below, in the test's own thread
            outcome.append(e)

    reading = threading.Thread(target=staff, daemon=True)
    reading.start()
    writer = os.open(pipe, os.O_WRONLY)  # held open: the reader never meets the end
    try:
        os.write(writer, b"# " + b"x" * (MAX_FILE_BYTES + 10))
        reading.join(timeout=30)
        assert not reading.is_alive(), "still reading: the file was read to its end"
    finally:
        os.close(writer)
        reading.join(timeout=30)
    [error] = outcome
    assert isinstance(error, CampaignError) and "over 256 KB" in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize("change", ["discreet", "forgotten"])
def test_a_click_read_before_the_reader_turned_discreet_or_was_forgotten_keeps_no_row(
    world: World, change: str
) -> None:
    """Attack (a race on a reader at risk): the reader's "I wrote" page read them as not
    discreet, then they turned discreet (or asked to be forgotten), which deletes their rows,
    then the click counted. Before, the row was written after the deletion and kept, linking a
    discreet reader to the case; now the insert reads the reader's state from the database (on
    PostgreSQL under a lock the change waits for), and nothing is recorded."""
    factory, _, clock = world
    case_id, ids = _sent_case(world)
    with unit_of_work(factory) as page:
        reader = page.get(Subscriber, ids[0])
        assert reader is not None and reader.discreet == "off"
        with unit_of_work(factory) as other:
            if change == "discreet":
                set_reading(
                    other, subscriber_id=ids[0], discreet="pointer", now=clock.now(), actor="t"
                )
            else:
                email = other.get(Subscriber, ids[0]).email  # type: ignore[union-attr]
                forget(session=other, email=email, secret=SECRET, now=clock.now(), actor="t")
        assert not record_wrote(page, case_id=case_id, subscriber_id=ids[0])
    assert _rows(factory) == 0
