"""Two-person approval of console alerts, on SQLite and PostgreSQL, delivered through real SMTP."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.approvals import (
    approval_state,
    approve,
    break_glass,
    check_verdict,
    revision_hash,
    submit_for_approval,
)
from newsletter.campaigns import get_campaign
from newsletter.check import stored_variants
from newsletter.clock import FrozenClock
from newsletter.compose import DraftInput, LanguageText, create_draft, update_draft
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Approval,
    CampaignRevision,
    CampaignStatus,
    Delivery,
    Event,
    Subscriber,
    Subscription,
)
from newsletter.errors import ApprovalError, CampaignError
from newsletter.lists import read_lists, sync_lists
from newsletter.smtp import SmtpPool
from newsletter.staff_notices import approval_request_message, break_glass_message
from newsletter.test_send import send_training
from tests.builders import deliver
from tests.conftest import SmtpServer, make_settings

ROOT = Path(__file__).resolve().parents[1]
ALERTS = "urgent-actions"


@dataclass(frozen=True)
class Staffer:
    """A plain staff member, as staff.StaffView would give one (the Approver protocol)."""

    email: str
    role: str
    training: bool = False


AUTHOR = Staffer("editor@staff.example.org", "editor")
ADMIN_AUTHOR = Staffer("admin@staff.example.org", "admin")
APPROVER = Staffer("approver@staff.example.org", "approver")
SECOND = Staffer("second@staff.example.org", "approver")
EDITOR = Staffer("other-editor@staff.example.org", "editor")


def seed_people(
    factory: sessionmaker[Session], clock: FrozenClock, n: int, langs: tuple[str, ...] = ("en",)
) -> None:
    """Sync the shipped lists and put n active people on both, languages in turn."""
    now = clock.now()
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        session.flush()
        from newsletter.lists import get_list

        lists = [get_list(session, "weekly-digest"), get_list(session, ALERTS)]
        for i in range(n):
            person = Subscriber(
                email=f"reader{i}@example.net", language=langs[i % len(langs)], created_at=now
            )
            session.add(person)
            session.flush()
            for ml in lists:
                session.add(
                    Subscription(
                        subscriber_id=person.id, list_id=ml.id, status="active", created_at=now
                    )
                )


def text_draft(title: str = "Write to the prisoner today", **texts: LanguageText) -> DraftInput:
    """A console draft from text: English always, other languages as given."""
    return DraftInput(
        list_slug=ALERTS,
        segment=None,
        item_ref=None,
        texts={"en": LanguageText(title, "Please **write** a letter."), **texts},
        url="https://portal.example.org/act",
    )


def drafted(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    *,
    author: Staffer = AUTHOR,
    training: bool = False,
) -> int:
    with unit_of_work(factory) as session:
        campaign = create_draft(
            session,
            draft=text_draft(),
            settings=settings,
            now=clock.now(),
            actor=author.email,
            training=training,
        )
        return campaign.id


def submitted(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, cid: int
) -> str:
    with unit_of_work(factory) as session:
        view = submit_for_approval(
            session, campaign_id=cid, settings=settings, now=clock.now(), actor=AUTHOR.email
        )
        assert view.problems == ()
        return view.hash


def approving(
    factory: sessionmaker[Session],
    settings: Settings,
    clock: FrozenClock,
    cid: int,
    who: Staffer,
    digest: str,
) -> int | None:
    with unit_of_work(factory) as session:
        return approve(
            session,
            campaign_id=cid,
            revision_hash=digest,
            approver=who,
            settings=settings,
            now=clock.now(),
        )


@pytest.fixture
def settings(database_url: str, smtpd: SmtpServer) -> Settings:
    return make_settings(database_url, smtpd)


def deliveries(factory: sessionmaker[Session], cid: int) -> int:
    with unit_of_work(factory) as session:
        return int(session.scalar(select(func.count()).where(Delivery.campaign_id == cid)) or 0)


def actions(factory: sessionmaker[Session]) -> list[str]:
    with unit_of_work(factory) as session:
        return [e.action for e in session.scalars(select(Event).order_by(Event.id))]


def test_each_member_gets_the_alert_once_after_another_person_approves(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 4)
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    assert deliveries(factory, cid) == 0
    assert approving(factory, settings, clock, cid, APPROVER, digest) == 4
    deliver(factory, settings, clock)
    deliver(factory, settings, clock)
    got = sorted(str(m["To"]) for m in smtpd.messages())
    assert got == sorted(f"reader{i}@example.net" for i in range(4))
    assert all("Write to the prisoner today" in str(m["Subject"]) for m in smtpd.messages())
    chain = actions(factory)
    assert chain.index("alert.submitted") < chain.index("alert.approved")
    assert chain.index("alert.approved") < chain.index("campaign.started")
    with unit_of_work(factory) as session:
        assert get_campaign(session, cid).approved_by == APPROVER.email


@pytest.mark.parametrize("author", [AUTHOR, ADMIN_AUTHOR])
def test_the_author_cannot_approve_even_as_admin(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, author: Staffer
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock, author=author)
    digest = submitted(factory, settings, clock, cid)
    me = replace(author, role="admin")
    with unit_of_work(factory) as session:
        state = approval_state(session, campaign_id=cid, settings=settings)
        assert not state.can_approve(me)
        assert state.can_approve(APPROVER)
    with pytest.raises(ApprovalError, match="author"):
        approving(factory, settings, clock, cid, me, digest)
    assert deliveries(factory, cid) == 0


def test_someone_who_edited_the_draft_cannot_approve_it(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    with unit_of_work(factory) as session:
        update_draft(
            session,
            campaign_id=cid,
            draft=text_draft("Write today, not tomorrow"),
            settings=settings,
            now=clock.now(),
            actor=APPROVER.email,
        )
    digest = submitted(factory, settings, clock, cid)
    with pytest.raises(ApprovalError, match="author"):
        approving(factory, settings, clock, cid, APPROVER, digest)
    assert approving(factory, settings, clock, cid, SECOND, digest) == 1


def test_an_editor_cannot_approve(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    with pytest.raises(ApprovalError, match="editor may not approve"):
        approving(factory, settings, clock, cid, EDITOR, digest)
    assert deliveries(factory, cid) == 0


def test_a_stale_hash_is_refused(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    first = submitted(factory, settings, clock, cid)
    with unit_of_work(factory) as session:
        update_draft(
            session,
            campaign_id=cid,
            draft=text_draft("A different title"),
            settings=settings,
            now=clock.now(),
            actor=AUTHOR.email,
        )
    second = submitted(factory, settings, clock, cid)
    assert first != second
    with pytest.raises(ApprovalError, match="changed since you looked"):
        approving(factory, settings, clock, cid, APPROVER, first)
    assert deliveries(factory, cid) == 0
    assert approving(factory, settings, clock, cid, APPROVER, second) == 1


def test_an_edit_voids_the_revision_and_its_approvals(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    settings = replace(settings, alerts=replace(settings.alerts, approvals_required=2))
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    assert approving(factory, settings, clock, cid, APPROVER, digest) is None
    with unit_of_work(factory) as session:
        update_draft(
            session,
            campaign_id=cid,
            draft=text_draft("Changed after the first approval"),
            settings=settings,
            now=clock.now(),
            actor=AUTHOR.email,
        )
        state = approval_state(session, campaign_id=cid, settings=settings)
        assert state.revision is not None and state.revision.voided
        assert not state.can_approve(SECOND)
        voided = session.scalar(select(CampaignRevision).where(CampaignRevision.campaign_id == cid))
        assert voided is not None and voided.voided_at == clock.now()
    # The old approval does not count towards the new revision: two fresh ones are needed.
    digest = submitted(factory, settings, clock, cid)
    assert approving(factory, settings, clock, cid, SECOND, digest) is None
    assert deliveries(factory, cid) == 0
    assert approving(factory, settings, clock, cid, APPROVER, digest) == 1


def test_two_distinct_approvals_when_configured(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 2)
    settings = replace(settings, alerts=replace(settings.alerts, approvals_required=2))
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    assert approving(factory, settings, clock, cid, APPROVER, digest) is None
    with pytest.raises(ApprovalError, match="already"):
        approving(
            factory, settings, clock, cid, replace(APPROVER, email=APPROVER.email.upper()), digest
        )
    assert deliveries(factory, cid) == 0
    assert approving(factory, settings, clock, cid, SECOND, digest) == 2
    with unit_of_work(factory) as session:
        assert session.scalar(select(func.count()).select_from(Approval)) == 2


def test_the_approved_hash_is_that_of_what_was_stored_at_launch(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 3, ("en", "be", "ru"))
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    assert approving(factory, settings, clock, cid, APPROVER, digest) == 3
    with unit_of_work(factory) as session:
        campaign = get_campaign(session, cid)
        assert campaign.status == CampaignStatus.RUNNING
        stored = stored_variants(session, campaign)
        assert {v.lang for v in stored} == set(settings.render.languages)
        assert (
            revision_hash(stored, list_id=campaign.list_id, segment_id=None, recipients=3) == digest
        )


def test_a_hash_is_free_of_the_render_nonce(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    # Submitting twice renders twice (two nonces); the same draft gives the same hash.
    assert submitted(factory, settings, clock, cid) == submitted(factory, settings, clock, cid)


def test_the_recipient_count_is_part_of_the_revision(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 2)
    cid = drafted(factory, settings, clock)
    with unit_of_work(factory) as session:
        view = submit_for_approval(
            session, campaign_id=cid, settings=settings, now=clock.now(), actor=AUTHOR.email
        )
        stored = stored_variants(session, get_campaign(session, cid))
        list_id = get_campaign(session, cid).list_id
    assert view.recipients == 2
    assert view.hash == revision_hash(stored, list_id=list_id, segment_id=None, recipients=2)
    assert view.hash != revision_hash(stored, list_id=list_id, segment_id=None, recipients=3)


def test_the_check_verdict_is_shown_and_a_failing_alert_is_not_launched(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    draft = replace(text_draft(), url="http://insecure.example.org/act")
    with unit_of_work(factory) as session:
        cid = create_draft(
            session, draft=draft, settings=settings, now=clock.now(), actor=AUTHOR.email
        ).id
    with unit_of_work(factory) as session:
        problems = check_verdict(session, campaign_id=cid, settings=settings)
        assert any("not https" in p for p in problems)
        view = submit_for_approval(
            session, campaign_id=cid, settings=settings, now=clock.now(), actor=AUTHOR.email
        )
        assert view.problems and any("not https" in p for p in view.problems)
    with pytest.raises(CampaignError, match="not https"):
        approving(factory, settings, clock, cid, APPROVER, view.hash)
    assert deliveries(factory, cid) == 0


def test_break_glass_needs_the_setting_a_reason_and_sends(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 2)
    cid = drafted(factory, settings, clock, author=APPROVER)
    digest = submitted(factory, settings, clock, cid)
    reason = "Every other approver is offline\x07 and the trial starts at dawn"

    def glass(s: Settings, why: str, who: Staffer = APPROVER) -> int:
        with unit_of_work(factory) as session:
            return break_glass(
                session,
                campaign_id=cid,
                revision_hash=digest,
                staff=who,
                reason=why,
                settings=s,
                now=clock.now(),
            )

    with pytest.raises(ApprovalError, match="break_glass"):
        glass(settings, reason)
    on = replace(settings, console=replace(settings.console, break_glass=True))
    with pytest.raises(ApprovalError, match="20 characters"):
        glass(on, "  because   ")
    with pytest.raises(ApprovalError, match="editor"):
        glass(on, reason, EDITOR)
    assert deliveries(factory, cid) == 0
    assert glass(on, reason) == 2
    with unit_of_work(factory) as session:
        row = session.scalars(select(Approval)).one()
        assert row.break_glass and row.approver == APPROVER.email
        assert "\x07" not in row.reason and row.reason.startswith("Every other approver")
        event = session.scalars(select(Event).where(Event.action == "alert.break_glass")).one()
        assert event.detail["hash"] == digest


def test_training_sends_only_to_staff_addresses(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock, smtpd: SmtpServer
) -> None:
    seed_people(factory, clock, 3)
    cid = drafted(factory, settings, clock, training=True)
    digest = submitted(factory, settings, clock, cid)
    trainee = replace(AUTHOR, role="approver", training=True)
    # Self-approval is allowed in training, and only there.
    with unit_of_work(factory) as session:
        assert (
            approve(
                session,
                campaign_id=cid,
                revision_hash=digest,
                approver=trainee,
                settings=settings,
                now=clock.now(),
                training_addresses=[AUTHOR.email, "coach@staff.example.org"],
            )
            == 0
        )

    async def run() -> list[tuple[str, str]]:
        pool = SmtpPool(settings.smtp)
        try:
            return await send_training(
                factory=factory,
                settings=settings,
                campaign_id=cid,
                actor=AUTHOR.email,
                now=clock.now(),
                transport=pool,
            )
        finally:
            await pool.close()

    outcomes = asyncio.run(run())
    assert [o for _, o in outcomes] == ["sent", "sent"]
    deliver(factory, settings, clock)
    got = sorted(str(m["To"]) for m in smtpd.messages())
    assert got == sorted([AUTHOR.email, "coach@staff.example.org"])
    assert all(str(m["Subject"]).startswith("[TRAINING] ") for m in smtpd.messages())
    assert deliveries(factory, cid) == 0
    with unit_of_work(factory) as session:
        assert get_campaign(session, cid).status == CampaignStatus.FINISHED
    assert "alert.training_sent" in actions(factory)
    assert "campaign.started" not in actions(factory)
    with pytest.raises(CampaignError, match="not approved and waiting"):
        asyncio.run(run())


def test_self_approval_outside_training_is_refused_even_with_the_training_flag_on_the_person(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    with pytest.raises(ApprovalError, match="author"):
        approving(
            factory, settings, clock, cid, replace(AUTHOR, role="admin", training=True), digest
        )


def test_global_training_mode_makes_every_draft_training(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    settings = replace(settings, console=replace(settings.console, training=True))
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    assert approving(factory, settings, clock, cid, replace(AUTHOR, role="approver"), digest) == 0
    assert deliveries(factory, cid) == 0


def test_an_approved_alert_cannot_be_edited_or_approved_again(
    factory: sessionmaker[Session], settings: Settings, clock: FrozenClock
) -> None:
    seed_people(factory, clock, 1)
    cid = drafted(factory, settings, clock)
    digest = submitted(factory, settings, clock, cid)
    approving(factory, settings, clock, cid, APPROVER, digest)
    clock.advance(minutes=1)
    with pytest.raises(CampaignError, match="running"), unit_of_work(factory) as session:
        update_draft(
            session,
            campaign_id=cid,
            draft=text_draft("Too late"),
            settings=settings,
            now=clock.now(),
            actor=AUTHOR.email,
        )
    with pytest.raises(ApprovalError, match="running"):
        approving(factory, settings, clock, cid, SECOND, digest)
    assert deliveries(factory, cid) == 1


@pytest.mark.parametrize("lang", ["en", "be", "ru"])
def test_staff_notices_are_neutral_and_link_to_the_console(
    database_url: str, clock: FrozenClock, lang: str
) -> None:
    settings = make_settings(database_url)
    url = f"{settings.console.base_url}/alerts/7"
    ask = approval_request_message(
        to=APPROVER.email, console_url=url, settings=settings, now=clock.now(), lang=lang
    )
    told = break_glass_message(
        to=APPROVER.email,
        console_url=url,
        actor=AUTHOR.email,
        reason="Nobody else awake\r\nBcc: x@example.org before the trial",
        settings=settings,
        now=clock.now(),
        lang=lang,
    )
    for msg in (ask, told):
        body = msg.get_content()
        assert url in body and str(msg["From"]).endswith(f"<{settings.mail.from_address}>")
        assert "Write to the prisoner" not in body + str(msg["Subject"])
        assert msg["Bcc"] is None and "\nBcc:" not in body
    assert AUTHOR.email in told.get_content() and "2026-11-23 09:00 UTC" in told.get_content()
    assert "Nobody else awake Bcc: x@example.org before the trial" in told.get_content()
    if lang != "en":
        assert "An alert is waiting" not in str(ask["Subject"])
