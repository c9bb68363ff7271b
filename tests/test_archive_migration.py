"""0005 upgrades a 0004 database with data in it: every campaign keeps its variants and deliveries,
and each gets a unique slug and stays in the archive."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import text

from newsletter.db import make_engine, migrate
from tests.test_migrations import _upgrade_to

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).replace(tzinfo=None)


def test_0005_keeps_campaigns_variants_and_deliveries_and_names_each(database_url: str) -> None:
    """From 0004 with two campaigns, their variants and deliveries, to head: nothing lost (SQLite
    batch mode would cascade them away), slugs unique and dated, archived true."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0004_console")
    with engine.begin() as c:
        c.execute(
            text(
                "insert into lists (slug, name, names, kind, double_opt_in, list_id, digest_cursor)"
                " values ('l', 'L', '{}', 'alerts', true, 'l.example.org', 0)"
            )
        )
        c.execute(
            text(
                "insert into subscribers (email, name, language, country, tags, attributes, status,"
                " created_at) values ('a@example.org', '', 'en', '', '[]', '{}', 'active', :now)"
            ),
            {"now": NOW},
        )
        for key, kind in (("k1", "alert"), ("k2", "digest")):
            c.execute(
                text(
                    "insert into campaigns (kind, list_id, status, dedupe_key, title, body_html,"
                    " url, created_by, approved_by, pause_reason, created_at, translations,"
                    " source_text, training) values (:kind, 1, 'finished', :key, 'T', '<p>b</p>',"
                    " '', 'cli', '', '', :now, '{}', '{}', false)"
                ),
                {"now": NOW, "key": key, "kind": kind},
            )
        for cid in (1, 2):
            c.execute(
                text(
                    "insert into variants (campaign_id, lang, subject, html, text, link_nonce)"
                    " values (:c, 'en', 'S', '<p>h</p>', 't', 'n')"
                ),
                {"c": cid},
            )
            c.execute(
                text(
                    "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                    " next_attempt_at, created_at) values (:c, 1, 'sent', 1, :now, :now)"
                ),
                {"now": NOW, "c": cid},
            )
    migrate(engine)
    with engine.connect() as c:
        assert c.execute(text("select count(*) from variants")).scalar() == 2
        assert c.execute(text("select count(*) from deliveries")).scalar() == 2
        rows = c.execute(text("select slug, archived from campaigns order by id")).all()
    assert [r[0] for r in rows] == ["alert-2026-12-01-1", "digest-2026-12-01-2"]
    assert all(r[1] for r in rows)
    engine.dispose()
