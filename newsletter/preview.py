"""Previews people can look at: each language's .html, .txt and .eml, written to a folder."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from newsletter.config import Settings
from newsletter.message import ListInfo, Recipient, build_message
from newsletter.render import RenderedVariant

PREVIEW_RECIPIENT = Recipient(subscriber_id=0, email="preview@example.org", name="Preview Reader")


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
