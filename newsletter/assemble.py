"""Assemble campaigns: a weekly digest from the items since the last one, or one urgent alert."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    CampaignStatus,
    DigestExclusion,
    Item,
    ListKind,
    MailingList,
)
from newsletter.db.queries import items_since
from newsletter.errors import CampaignError
from newsletter.lists import get_list
from newsletter.sanitize import clean_html, clean_text, clean_url
from newsletter.segments import get_segment

# A digest carries at most this many items, the newest: more is no read for anyone, and a feed
# of 20,000 items made a digest that took 5 minutes and 750 MB to render, then failed the size
# check anyway. The older ones are passed over (the cursor moves past them), said in the event.
MAX_DIGEST_ITEMS = 100
# At most this many items are set aside for the check (each one checked, excluded and named in
# the event); past them the rest are passed over too: a hostile feed costs a bounded amount.
MAX_SET_ASIDE = 100
SET_ASIDE_BY = "check"  # DigestExclusion.excluded_by of an item the check would refuse


def assemble_digest(
    *,
    session: Session,
    list_slug: str,
    now: datetime,
    actor: str,
    settings: Settings | None = None,
) -> Campaign | None:
    """Make a digest of the items since this list's last digest; None when nothing is new.

    The list's cursor moves in the same transaction that creates the campaign, so a repeated run
    finds nothing new and a missed run picks up everything since the last digest. Items staff
    left out (DigestExclusion, digest_control.py) are never in it; the cursor moves past them,
    as past items beyond the newest MAX_DIGEST_ITEMS. With the settings, an item the pre-send
    check would refuse (an http link, a host not allowed, a reader's page named in its text) is
    set aside as staff would leave it out, named with why in one event, and the others go: one
    item of one source must not hold every source's news. When none would pass, none is set
    aside, and the check refuses the digest, as a setting that refuses every item needs.
    """
    ml = _digest_list(session, list_slug)
    window = list(items_since(session, ml.digest_cursor))
    excluded = excluded_item_ids(session, ml.id)
    candidates = [item for item in window if item.id not in excluded]
    kept, set_aside = _newest_passing(candidates, settings)
    if set_aside and not kept:  # a setting refuses them all (allowed_link_hosts without the
        kept, set_aside = _newest_passing(candidates, None)  # portal): the check says so, loudly
    passed_over = len(candidates) - len(kept) - len(set_aside)
    for item, _why in set_aside:
        session.add(
            DigestExclusion(
                list_id=ml.id, item_id=item.id, excluded_by=SET_ASIDE_BY, excluded_at=now
            )
        )
    if set_aside:
        record_event(
            session,
            now=now,
            actor=SET_ASIDE_BY,
            action="digest.items_set_aside",
            list=ml.slug,
            items=[{"item": item.id, "reason": why} for item, why in set_aside],
        )
    items = [item for item in candidates if item.id in {k.id for k in kept}]  # window order
    if not items:
        # Items staff left out are passed over for good: the cursor moves past them.
        if window:
            ml.digest_cursor = max(i.id for i in window)
            session.flush()
        return None
    first, last = min(i.id for i in items), max(i.id for i in window)
    campaign = Campaign(
        kind=CampaignKind.DIGEST,
        list_id=ml.id,
        status=CampaignStatus.DRAFT,
        dedupe_key=f"digest:{ml.id}:{first}-{last}",
        created_by=actor,
        created_at=now,
        items=items,
    )
    ml.digest_cursor = last
    session.add(campaign)
    more = {"passed_over": passed_over} if passed_over else {}
    record_event(
        session,
        now=now,
        actor=actor,
        action="digest.assembled",
        list=ml.slug,
        items=len(items),
        **more,
    )
    session.flush()
    return campaign


def _newest_passing(
    items: list[Item], settings: Settings | None
) -> tuple[list[Item], list[tuple[Item, str]]]:
    """The newest MAX_DIGEST_ITEMS items the pre-send check would let through (all of them,
    without settings), and the items met on the way it would refuse, with why."""
    if settings is not None:
        from newsletter.check import item_problem  # the check loads lxml: only when asked for
    kept: list[Item] = []
    set_aside: list[tuple[Item, str]] = []
    for item in sorted(items, key=lambda item: (item.published_at, item.id), reverse=True):
        if len(kept) == MAX_DIGEST_ITEMS or len(set_aside) == MAX_SET_ASIDE:
            break
        why = item_problem(item.title, item.link, item.summary_html, settings) if settings else ""
        if why:
            set_aside.append((item, why))
        else:
            kept.append(item)
    return kept, set_aside


def excluded_item_ids(session: Session, list_id: int) -> set[int]:
    """The items staff left out of this list's digests."""
    stmt = select(DigestExclusion.item_id).where(DigestExclusion.list_id == list_id)
    return set(session.scalars(stmt))


def last_digest(*, session: Session, list_slug: str) -> Campaign | None:
    """The list's digest that went out last (its sending started), or None before the first."""
    ml = _digest_list(session, list_slug)
    return session.scalar(
        select(Campaign)
        .where(
            Campaign.kind == CampaignKind.DIGEST,
            Campaign.list_id == ml.id,
            Campaign.started_at.is_not(None),
        )
        .order_by(Campaign.started_at.desc(), Campaign.id.desc())
        .limit(1)
    )


def _digest_list(session: Session, list_slug: str) -> MailingList:
    ml = get_list(session, list_slug)
    if ml.kind != ListKind.DIGEST:
        raise CampaignError(f"list '{list_slug}' is a {ml.kind} list, not a digest list")
    return ml


def items_for_language(items: Sequence[Item], *, lang: str, default_lang: str) -> list[Item]:
    """The items a reader of `lang` gets: their language's feeds, else the default language's.

    Sources are declared per language ([sources] feeds, lang = "be" ...). Where a language has
    no feed, or its feeds had nothing new, the reader gets the default language's items as
    published (the email around them is still in their language); failing that, every item,
    so nobody gets an empty digest.
    """
    for want in (lang, default_lang):
        chosen = [item for item in items if item.source.lang == want]
        if chosen:
            return chosen
    return list(items)


def find_item(session: Session, ref: str) -> Item:
    """Find the one ingested item whose guid or link is `ref`; refuse a reference to several.

    Any source may publish an item whose link or guid is another source's guid: picking one of
    several matches would let it stand in for the item meant.
    """
    items = session.scalars(
        select(Item).where(or_(Item.guid == ref, Item.link == ref)).order_by(Item.id).limit(10)
    ).all()
    if not items:
        raise CampaignError(
            f"no ingested item has the guid or link {ref!r}; run `newsletter ingest`"
        )
    if len(items) > 1:
        many = f"{len(items)}" if len(items) < 10 else "10 or more"
        raise CampaignError(
            f"{ref!r} matches {many} items (by guid or link); "
            "give the guid of one source's item, or a link only it has"
        )
    return items[0]


def assemble_alert(
    *,
    session: Session,
    list_slug: str,
    now: datetime,
    actor: str,
    item_ref: str | None = None,
    item: Item | None = None,
    title: str = "",
    body_html: str = "",
    url: str = "",
    base_url: str = "",
    segment: str | None = None,
) -> tuple[Campaign, bool]:
    """Make an urgent alert from an item or from staff text; returns (campaign, created).

    The item is given itself (`item`, as the scheduler has it) or by reference (`item_ref`, its
    guid or link, as staff type it: find_item).

    The same alert to the same list is one campaign: asking again returns the existing one, so a
    repeated command can finish a send but never doubles it.
    """
    ml = get_list(session, list_slug)
    if item is None and item_ref:
        item = find_item(session, item_ref)
    if item is not None:
        key, items = f"alert:{ml.id}:item:{item.id}", [item]
        title, body_html, url = "", "", ""
    else:
        title = clean_text(title, max_length=300)
        if not title:
            raise CampaignError("an alert needs --item, or --title and --body-file")
        body_html = clean_html(body_html, base_url=base_url or url or "https://invalid/")
        url = clean_url(url, base_url=base_url) if url else ""
        digest = hashlib.sha256(f"{title}\0{body_html}\0{url}".encode()).hexdigest()[:40]
        key, items = f"alert:{ml.id}:text:{digest}", []
    segment_id = get_segment(session, segment).id if segment else None
    if segment_id is not None:
        key += f":segment:{segment_id}"
    existing = session.scalar(select(Campaign).where(Campaign.dedupe_key == key))
    if existing is not None:
        return existing, False
    campaign = Campaign(
        kind=CampaignKind.ALERT,
        list_id=ml.id,
        segment_id=segment_id,
        status=CampaignStatus.DRAFT,
        dedupe_key=key,
        title=title,
        body_html=body_html,
        url=url,
        created_by=actor,
        created_at=now,
        items=items,
    )
    session.add(campaign)
    record_event(session, now=now, actor=actor, action="alert.created", list=ml.slug, key=key)
    session.flush()
    return campaign, True
