"""End to end: every accepted hostile feed, ingested and rendered, yields a clean email."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import Settings, SourcesSettings
from newsletter.db import unit_of_work
from newsletter.db.models import Item
from newsletter.ingest import ingest_source
from newsletter.render import CampaignView, ItemView, RenderedVariant, render_variant

CORPUS = Path(__file__).parent / "data" / "feeds"
NOW = datetime(2024, 3, 4, 9, 0, tzinfo=UTC)
SETTINGS = Settings()
# Always checked, whatever the case lists: none of these may reach a reader.
ALWAYS_ABSENT = ("<script", "javascript:", "vbscript:", "alert(", "root:", "\u202e", "\u2066")
BENIGN = ItemView(
    title="Ales Bialiatski released!",
    link="https://portal.example.org/2014/06/ales-bialiatski-released/",
    summary_html='<p>Free at <a href="https://portal.example.org/">last</a>.</p>',
    published_at=NOW,
    categories=("Viasna",),
)


def accepted_cases() -> list[Any]:
    cases = []
    for case in sorted(CORPUS.iterdir()):
        expected = json.loads((case / "expected.json").read_text(encoding="utf-8"))
        if "rejected" not in expected:
            cases.append(pytest.param(case, expected, id=case.name))
    return cases


def ingested_views(factory: sessionmaker[Session], feed: Path) -> list[ItemView]:
    """Ingest a feed file and return its items as render views (content preferred to summary)."""
    with unit_of_work(factory) as session:
        ingest_source(
            session=session,
            url_or_path=str(feed),
            settings=SourcesSettings(),
            clock=FrozenClock(NOW),
        )
    with factory() as session:
        return [
            ItemView(
                title=row.title,
                link=row.link,
                summary_html=row.content_html or row.summary_html,
                published_at=row.published_at,
                categories=tuple(row.categories),
            )
            for row in session.scalars(select(Item).order_by(Item.id))
        ]


def renders(items: list[ItemView]) -> Iterator[RenderedVariant]:
    """One digest of all items, and one alert per item."""
    yield render_variant(
        CampaignView(kind="digest", list_name="Weekly digest", items=tuple(items)),
        lang="en",
        settings=SETTINGS,
    )
    for item in items:
        alert = CampaignView(kind="alert", list_name="Urgent actions", items=(item,))
        yield render_variant(alert, lang="en", settings=SETTINGS)


def template_markers(markers: list[str]) -> set[str]:
    """Markers the templates themselves produce (say "<meta" or "style="): not the feed's doing."""
    benign = list(renders([BENIGN]))
    output = "\n".join(v.subject + v.html + v.text for v in benign).casefold()
    return {marker for marker in markers if marker.casefold() in output}


@pytest.mark.parametrize(("case", "expected"), accepted_cases())
def test_hostile_feed_renders_clean_email(
    factory: sessionmaker[Session], case: Path, expected: dict[str, Any]
) -> None:
    """No hostile marker of an accepted feed reaches an email; its subjects stay one line."""
    markers = [*expected.get("absent", []), *ALWAYS_ABSENT]
    ours = template_markers(markers)
    checked = [marker for marker in markers if marker not in ours]
    items = ingested_views(factory, case / "feed.xml")
    assert len(items) == expected["items"]
    for variant in renders(items):
        assert "\r" not in variant.subject and "\n" not in variant.subject
        for part in (variant.subject, variant.html, variant.text):
            for marker in checked:
                assert marker.casefold() not in part.casefold(), marker
