"""Previews people can look at: each language's .html, .txt and .eml, written to a folder.

With a Chromium at hand, also PNG screenshots of the HTML (screenshot.py), and always the result
of the pre-send check, so staff see what a send would refuse before they try it.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from newsletter.check import Problem, check_campaign, stored_variants
from newsletter.config import Settings
from newsletter.db.models import Campaign
from newsletter.message import ListInfo, Recipient, build_message
from newsletter.render import RenderedVariant
from newsletter.screenshot import Screenshot, take_screenshots

PREVIEW_RECIPIENT = Recipient(subscriber_id=0, email="preview@example.org", name="Preview Reader")


@dataclass(frozen=True)
class PreviewReport:
    files: list[Path]
    screenshots: list[Screenshot]
    problems: list[Problem]


def preview_campaign(
    session: Session,
    campaign: Campaign,
    *,
    settings: Settings,
    out_dir: Path,
    stem: str,
    now: datetime,
    langs: Collection[str] | None = None,
    chromium: str | None = None,
) -> PreviewReport:
    """Check a campaign and write its previews (and screenshots when given a chromium).

    Renders and stores the variants in the session like a send would; the caller rolls back.
    """
    problems = check_campaign(session, campaign, settings)
    variants = [v for v in stored_variants(session, campaign) if langs is None or v.lang in langs]
    ml = campaign.mailing_list
    files = write_previews(
        variants=variants,
        out_dir=out_dir,
        stem=stem,
        mlist=ListInfo(ml.id, ml.slug, ml.list_id),
        settings=settings,
        now=now,
    )
    shots: list[Screenshot] = []
    if chromium:
        pages = [path for path in files if path.suffix == ".html"]
        shots = take_screenshots(pages, chromium=chromium)
    return PreviewReport(files, shots, problems)


def write_previews(
    *,
    variants: Sequence[RenderedVariant],
    out_dir: Path,
    stem: str,
    mlist: ListInfo,
    settings: Settings,
    now: datetime,
) -> list[Path]:
    """Write STEM.LANG.html/.txt/.eml for each variant; the links in them are for looking only."""
    if not settings.security.secret:  # a preview must work before a secret is configured
        settings = replace(
            settings, security=replace(settings.security, secret=secrets.token_urlsafe(32))
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for v in variants:
        msg = build_message(
            variant=v,
            campaign_id=0,
            recipient=PREVIEW_RECIPIENT,
            mlist=mlist,
            settings=settings,
            now=now,
        )
        html_part = msg.get_body(("html",))
        text_part = msg.get_body(("plain",))
        assert html_part is not None and text_part is not None
        for suffix, data in (
            ("html", html_part.get_content().encode("utf-8")),
            ("txt", text_part.get_content().encode("utf-8")),
            ("eml", msg.as_bytes()),
        ):
            path = out_dir / f"{stem}.{v.lang}.{suffix}"
            path.write_bytes(data)
            written.append(path)
    return written
