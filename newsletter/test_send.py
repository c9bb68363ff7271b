"""Test sends of an alert to a few staff addresses, and a training alert's send to staff only.

A test is of an alert not yet started and of nothing else (a digest, a case message or a started
alert is refused before anything is rendered). Its message is the draft's submitted variant,
else a fresh render that is never stored, made into bytes by the sender's own builder
(message.MessageTemplate), with "[TEST] " before the subject and every personal link replaced by
an inert one (the alert's page in the console), so no working token leaves the service. Nothing
is written to the delivery ledger and nothing is counted in the campaign; each send is an event.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime, make_msgid

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.orm import Session, sessionmaker

from newsletter.approvals import is_training, training_recipients
from newsletter.audit import record_event
from newsletter.check import stored_variants
from newsletter.compose import require_unstarted
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, CampaignKind, CampaignStatus
from newsletter.errors import CampaignError
from newsletter.i18n import N_
from newsletter.message import ListInfo, MessageTemplate
from newsletter.render import RenderedVariant
from newsletter.smtp import Result, Transport
from newsletter.variants import render_campaign

MAX_TEST_ADDRESSES = 5
TEST_PREFIX = "[TEST] "
TRAINING_PREFIX = "[TRAINING] "


def clean_addresses(addresses: Sequence[str], *, limit: int = MAX_TEST_ADDRESSES) -> list[str]:
    """The addresses cleaned, checked (syntax only) and without repeats; else CampaignError."""
    found: dict[str, str] = {}
    for raw in addresses:
        value = raw.strip()
        if not value:
            continue
        if any(not ch.isprintable() for ch in value):
            raise CampaignError.of(
                N_("an address may not contain line breaks or control characters")
            )
        try:
            address = validate_email(value, check_deliverability=False).normalized
        except EmailNotValidError as e:
            raise CampaignError.of(
                N_("not an email address: %(address)s (%(reason)s)"),
                address=repr(value[:100]),
                reason=str(e),
            ) from None
        found.setdefault(address.casefold(), address)
    if not found:
        raise CampaignError.of(N_("give at least one address to send the test to"))
    if len(found) > limit:
        raise CampaignError.of(
            N_("a test goes to at most %(limit)s addresses, not %(count)s"),
            limit=limit,
            count=len(found),
        )
    return list(found.values())


def inert_url(settings: Settings, campaign_id: int) -> str:
    """Where a test message's personal links point: the alert's page in the console."""
    return f"{settings.console.base_url.rstrip('/')}/alerts/{campaign_id}"


def build_test_message(
    variant: RenderedVariant,
    *,
    campaign_id: int,
    mlist: ListInfo,
    to: str,
    settings: Settings,
    now: datetime,
    prefix: str = TEST_PREFIX,
) -> bytes:
    """One test message: the sender's builder, a marked subject, inert personal links."""
    marked = dataclasses.replace(variant, subject=prefix + variant.subject)
    template = MessageTemplate.build(
        variant=marked, campaign_id=campaign_id, mlist=mlist, settings=settings
    )
    inert = inert_url(settings, campaign_id)
    urls = {"unsubscribe": inert, "preferences": inert}
    domain = settings.mail.from_address.rpartition("@")[2]
    # No List-Unsubscribe: a mail client's unsubscribe button must not act on a test.
    headers = (
        f"To: {to}\r\nDate: {format_datetime(now)}\r\nMessage-ID: {make_msgid(domain=domain)}\r\n"
        "Auto-Submitted: auto-generated\r\n"
    )
    return b"".join(
        (
            headers.encode("ascii"),
            template.head,
            template.text.fill(urls),
            template.middle,
            template.html.fill(urls),
            template.tail,
        )
    )


async def send_test(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    campaign_id: int,
    addresses: list[str],
    actor: str,
    now: datetime,
    transport: Transport,
    lang: str | None = None,
) -> list[tuple[str, str]]:
    """Send one language's variant (the default one's unless `lang`) as a test; per address."""
    chosen = clean_addresses(addresses)
    session = factory()
    try:  # read only: a fresh render is made for the test and never stored
        variant, mlist = _variant(session, campaign_id, lang or "", settings)
    finally:
        session.rollback()
        session.close()
    outcomes = await _send_all(
        variant, campaign_id=campaign_id, mlist=mlist, to=chosen, settings=settings,
        now=now, transport=transport, prefix=TEST_PREFIX,
    )  # fmt: skip
    with unit_of_work(factory) as session:
        record_event(
            session,
            now=now,
            actor=actor,
            action="alert.test_sent",
            campaign=campaign_id,
            lang=variant.lang,
            addresses=len(chosen),
            # Who got an unapproved text: the audit must show where a draft went.
            to=chosen,
            sent=sum(1 for _, result in outcomes if result == Result.SENT),
        )
    return outcomes


async def send_training(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    campaign_id: int,
    actor: str,
    now: datetime,
    transport: Transport,
) -> list[tuple[str, str]]:
    """Send an approved training alert to its staff addresses only; then it is finished.

    approvals.approve made it ready (event "alert.training_ready" with the addresses). No
    delivery is queued: the list's members never get a training alert. Nothing sent (every
    address failed) leaves it ready, to try again.
    """
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        addresses = training_recipients(session, campaign_id)
        if campaign is None or not is_training(campaign, settings):
            raise CampaignError.of(N_("alert %(id)s is not a training alert"), id=campaign_id)
        if campaign.status != CampaignStatus.DRAFT or not addresses:
            raise CampaignError.of(
                N_("training alert %(id)s is not approved and waiting"), id=campaign_id
            )
        chosen = clean_addresses(addresses, limit=max(len(addresses), 1))
        by_lang = {v.lang: v for v in stored_variants(session, campaign)}
        variant = by_lang.get(settings.render.default_language) or next(iter(by_lang.values()))
        mlist = _list_info(campaign)
    outcomes = await _send_all(
        variant, campaign_id=campaign_id, mlist=mlist, to=chosen, settings=settings,
        now=now, transport=transport, prefix=TRAINING_PREFIX,
    )  # fmt: skip
    sent = sum(1 for _, result in outcomes if result == Result.SENT)
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, campaign_id)
        assert campaign is not None
        if sent:
            # Marked, whatever made it training (its author's account, or the console's
            # training mode, which may be switched off later): never in the public archive.
            campaign.training = True
            campaign.status = CampaignStatus.FINISHED
            campaign.started_at = campaign.started_at or now
            campaign.finished_at = now
        record_event(
            session,
            now=now,
            actor=actor,
            action="alert.training_sent",
            campaign=campaign_id,
            addresses=len(chosen),
            sent=sent,
        )
    return outcomes


async def _send_all(
    variant: RenderedVariant,
    *,
    campaign_id: int,
    mlist: ListInfo,
    to: list[str],
    settings: Settings,
    now: datetime,
    transport: Transport,
    prefix: str,
) -> list[tuple[str, str]]:
    outcomes = []
    for address in to:
        data = build_test_message(
            variant, campaign_id=campaign_id, mlist=mlist, to=address, settings=settings,
            now=now, prefix=prefix,
        )  # fmt: skip
        outcome = await transport.send(data, sender=settings.mail.from_address, recipient=address)
        outcomes.append((address, str(outcome.result)))
    return outcomes


def _variant(
    session: Session, campaign_id: int, lang: str, settings: Settings
) -> tuple[RenderedVariant, ListInfo]:
    """The variant in `lang` (else the default language's) of an alert not started (composed in
    the console or held from the feed): its stored variants once submitted, else a fresh
    render; anything else (a digest, a case message, a started alert) is refused before."""
    campaign = session.get(Campaign, campaign_id)  # checked first: an alert not started yet,
    if (  # composed, held from the feed or from the CLI; a case's messages are alerts too
        campaign is None
        or campaign.kind != CampaignKind.ALERT
        or not campaign.dedupe_key.startswith("alert:")
    ):
        raise CampaignError.of(N_("no console alert draft %(id)s"), id=campaign_id)
    require_unstarted(campaign)
    variants = stored_variants(session, campaign)
    if not variants or any(not v.nonce for v in variants):
        variants = render_campaign(campaign, settings=settings)
    by_lang = {v.lang: v for v in variants}
    variant = by_lang.get(lang) or by_lang.get(settings.render.default_language)
    if variant is None:
        if not lang:
            raise CampaignError.of(
                N_("campaign %(id)s has no variant in any language"), id=campaign_id
            )
        raise CampaignError.of(
            N_("campaign %(id)s has no variant in %(lang)s"), id=campaign_id, lang=lang
        )
    return variant, _list_info(campaign)


def _list_info(campaign: Campaign) -> ListInfo:
    ml = campaign.mailing_list
    return ListInfo(ml.id, ml.slug, ml.list_id)
