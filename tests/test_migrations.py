"""Operators upgrade in place: a database made by earlier migrations, with data, upgrades intact."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from newsletter.db import MIGRATIONS, make_engine, migrate
from newsletter.parse import parse_feed

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).replace(tzinfo=None)


def _upgrade_to(engine: object, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:  # type: ignore[attr-defined]
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def _two_sent_deliveries(engine: Engine) -> None:
    """A list, two readers and an alert campaign with one sent delivery to each (ids 1 and 2)."""
    with engine.begin() as c:
        c.execute(
            text(
                "insert into lists (slug, name, names, kind, double_opt_in, list_id, digest_cursor)"
                " values ('l', 'L', '{}', 'alerts', true, 'l.example.org', 0)"
            )
        )
        for email in ("a@gmail.com", "b@example.org"):
            c.execute(
                text(
                    "insert into subscribers (email, name, language, country, tags, attributes,"
                    " status, created_at, discreet, on_key_problem) values (:email, '', 'en', '',"
                    " '[]', '{}', 'active', :now, 'off', 'withhold')"
                ),
                {"email": email, "now": NOW},
            )
        c.execute(
            text(
                "insert into campaigns (kind, list_id, status, dedupe_key, title, body_html, url,"
                " created_by, approved_by, pause_reason, created_at, translations, source_text,"
                " training, slug, archived) values ('alert', 1, 'running', 'k', 'T', '', '',"
                " 'cli', '', '', :now, '{}', '{}', false, 'alert-x', true)"
            ),
            {"now": NOW},
        )
        for subscriber in (1, 2):
            c.execute(
                text(
                    "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                    " next_attempt_at, created_at, sent_at) values (1, :s, 'sent', 1, :now, :now,"
                    " :now)"
                ),
                {"s": subscriber, "now": NOW},
            )


def test_0004_keeps_every_campaign_variant_delivery_and_event(database_url: str) -> None:
    """From 0003 with a campaign, its variant, a delivery and an event, to head: all still there,
    the new campaign columns at their defaults, and the audit trail now refuses UPDATE/DELETE."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0003_links")
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
        c.execute(
            text(
                "insert into campaigns (kind, list_id, status, dedupe_key, title, body_html, url,"
                " created_by, approved_by, pause_reason, created_at) values ('alert', 1,"
                " 'running', 'k', 'T', '<p>b</p>', '', 'cli', '', '', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into variants (campaign_id, lang, subject, html, text, link_nonce)"
                " values (1, 'en', 'S', '<p>h</p>', 't', 'n')"
            )
        )
        c.execute(
            text(
                "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                " next_attempt_at, created_at) values (1, 1, 'queued', 0, :now, :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text("insert into events (at, actor, action, detail) values (:now, 'cli', 'x', '{}')"),
            {"now": NOW},
        )
    migrate(engine)
    with engine.connect() as c:
        assert c.execute(text("select count(*) from variants")).scalar() == 1
        assert c.execute(text("select count(*) from deliveries")).scalar() == 1
        assert c.execute(text("select count(*) from events")).scalar() == 1
        row = c.execute(text("select title, training from campaigns")).one()
        assert row[0] == "T" and not row[1]
    for statement in ("update events set actor = 'someone else'", "delete from events"):
        with pytest.raises(SQLAlchemyError, match="append-only"), engine.begin() as c:
            c.execute(text(statement))
    with engine.connect() as c:
        assert c.execute(text("select actor from events")).scalar() == "cli"
    engine.dispose()


def test_0006_keeps_subscribers_and_gives_them_the_reading_defaults(database_url: str) -> None:
    """From 0005 with a subscriber, a subscription, a campaign and a delivery, to head: all
    there, every subscriber not discreet and withholding on a key problem, no keys yet; and a
    key and a withheld delivery can be written after."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0005_archive")
    with engine.begin() as c:
        c.execute(
            text(
                "insert into lists (slug, name, names, kind, double_opt_in, list_id, digest_cursor)"
                " values ('l', 'L', '{}', 'digest', true, 'l.example.org', 0)"
            )
        )
        c.execute(
            text(
                "insert into subscribers (email, name, language, country, tags, attributes, status,"
                " created_at) values ('a@example.org', 'Ann', 'be', '', '[]', '{}', 'active', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into subscriptions (subscriber_id, list_id, status, created_at)"
                " values (1, 1, 'active', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into campaigns (kind, list_id, status, dedupe_key, title, body_html, url,"
                " created_by, approved_by, pause_reason, created_at, translations, source_text,"
                " training, slug, archived) values ('digest', 1, 'running', 'k', 'T', '', '',"
                " 'cli', '', '', :now, '{}', '{}', false, 'digest-x', true)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                " next_attempt_at, created_at) values (1, 1, 'queued', 0, :now, :now)"
            ),
            {"now": NOW},
        )
    migrate(engine)
    with engine.begin() as c:
        row = c.execute(text("select email, name, discreet, on_key_problem from subscribers")).one()
        assert tuple(row) == ("a@example.org", "Ann", "off", "withhold")
        assert c.execute(text("select count(*) from subscriptions")).scalar() == 1
        assert c.execute(text("select count(*) from deliveries")).scalar() == 1
        c.execute(
            text(
                "insert into reader_keys (subscriber_id, status, fingerprint, armored, created_at)"
                " values (1, 'active', 'ABCD', 'key', :now)"
            ),
            {"now": NOW},
        )
        c.execute(text("update deliveries set status = 'withheld'"))
    with engine.begin() as c:
        c.execute(text("delete from subscribers"))  # a key goes with its reader
        assert c.execute(text("select count(*) from reader_keys")).scalar() == 0
    engine.dispose()


def test_0007_keeps_campaigns_deliveries_and_keys_and_adds_cases(database_url: str) -> None:
    """From 0006 with a list, a reader with a key, a campaign and a sent delivery, to head: all
    there; then a case, its message (that campaign) and a reader's "I wrote" can be written, and
    go with their case."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0006_readers_at_risk")
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
                " created_at, discreet, on_key_problem) values ('a@example.org', 'Ann', 'ru', '',"
                " '[]', '{}', 'active', :now, 'envelope', 'plain')"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into reader_keys (subscriber_id, status, fingerprint, armored, created_at)"
                " values (1, 'active', 'ABCD', 'key', :now)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into campaigns (kind, list_id, status, dedupe_key, title, body_html, url,"
                " created_by, approved_by, pause_reason, created_at, translations, source_text,"
                " training, slug, archived) values ('alert', 1, 'finished', 'k', 'T', '', '',"
                " 'cli', '', '', :now, '{}', '{}', false, 'alert-x', true)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                " next_attempt_at, created_at) values (1, 1, 'sent', 1, :now, :now)"
            ),
            {"now": NOW},
        )
    migrate(engine)
    with engine.begin() as c:
        row = c.execute(text("select email, discreet, on_key_problem from subscribers")).one()
        assert tuple(row) == ("a@example.org", "envelope", "plain")
        assert c.execute(text("select count(*) from reader_keys")).scalar() == 1
        assert c.execute(text("select status from deliveries")).scalar() == "sent"
        assert c.execute(text("select count(*) from cases")).scalar() == 0
        c.execute(
            text(
                "insert into cases (year, seq, reference, status, outcome, title, body_html,"
                " actions_html, person, person_public, targets, letters, list_id, created_by,"
                " created_at, archived, wrote_total) values (2026, 1, 'UA 1/26', 'open', '', 'T',"
                " '', '', '', true, '[]', '{}', 1, 'cli', :now, true, 0)"
            ),
            {"now": NOW},
        )
        c.execute(
            text(
                "insert into case_messages (campaign_id, case_id, role, number, body_html,"
                " include_new, copies) values (1, 1, 'first', 0, '', false, '{}')"
            )
        )
        c.execute(text("insert into case_letters (case_id, subscriber_id) values (1, 1)"))
    with pytest.raises(SQLAlchemyError), engine.begin() as c:  # one number per year
        c.execute(
            text(
                "insert into cases (year, seq, reference, status, outcome, title, body_html,"
                " actions_html, person, person_public, targets, letters, list_id, created_by,"
                " created_at, archived, wrote_total) values (2026, 1, 'UA 1/26b', 'draft', '',"
                " 'T', '', '', '', true, '[]', '{}', 1, 'cli', :now, true, 0)"
            ),
            {"now": NOW},
        )
    with engine.begin() as c:
        c.execute(text("delete from cases"))  # its messages' links and letters go with it
        assert c.execute(text("select count(*) from case_messages")).scalar() == 0
        assert c.execute(text("select count(*) from case_letters")).scalar() == 0
        assert c.execute(text("select count(*) from campaigns")).scalar() == 1
    engine.dispose()


def test_0008_keeps_campaigns_and_deliveries_and_counts_complaints_once(database_url: str) -> None:
    """From 0007 with a campaign and two sent deliveries, to head: all there; a complaint per
    delivery can be written, a second one for the same delivery cannot, and complaints go with
    their campaign."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0007_cases")
    _two_sent_deliveries(engine)
    migrate(engine)
    with engine.begin() as c:
        assert (
            c.execute(
                text("select count(*) from deliveries where sent_at = :now"), {"now": NOW}
            ).scalar()
            == 2
        )
        assert c.execute(text("select status from campaigns")).scalar() == "running"
        for delivery in (1, 2):
            c.execute(
                text(
                    "insert into complaints (delivery_id, campaign_id, created_at)"
                    " values (:d, 1, :now)"
                ),
                {"d": delivery, "now": NOW},
            )
    with pytest.raises(SQLAlchemyError), engine.begin() as c:  # one per delivery
        c.execute(
            text(
                "insert into complaints (delivery_id, campaign_id, created_at) values (1, 1, :now)"
            ),
            {"now": NOW},
        )
    with engine.begin() as c:
        assert c.execute(text("select count(*) from complaints")).scalar() == 2
        c.execute(text("delete from campaigns"))  # its deliveries and complaints go with it
        assert c.execute(text("select count(*) from complaints")).scalar() == 0
        assert c.execute(text("select count(*) from subscribers")).scalar() == 2
    engine.dispose()


def test_0009_keeps_deliveries_and_complaints_and_never_gives_a_delivery_id_twice(
    database_url: str,
) -> None:
    """From 0008 with two sent deliveries and a complaint, to head: all there, every index and
    cascade in place; and once the newest delivery is deleted (as `forget` deletes a reader's),
    the next delivery gets a new id, so an old VERP address cannot name someone else's."""
    engine = make_engine(database_url)
    _upgrade_to(engine, "0008_complaints")
    _two_sent_deliveries(engine)
    with engine.begin() as c:
        c.execute(
            text("insert into complaints (delivery_id, campaign_id, created_at) values (2, 1, :n)"),
            {"n": NOW},
        )
    migrate(engine)
    with engine.begin() as c:
        rows = c.execute(text("select id, subscriber_id, status from deliveries order by id"))
        assert [tuple(r) for r in rows] == [(1, 1, "sent"), (2, 2, "sent")]
        assert c.execute(text("select delivery_id from complaints")).scalars().all() == [2]
        indexes = {i["name"] for i in inspect(c).get_indexes("deliveries")}
        assert {"ix_deliveries_claim", "ix_deliveries_due", "ix_deliveries_sent_at"} <= indexes
        c.execute(text("delete from deliveries where id = 2"))  # the complaint goes with it
        assert c.execute(text("select count(*) from complaints")).scalar() == 0
        c.execute(
            text(
                "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                " next_attempt_at, created_at) values (1, 2, 'queued', 0, :n, :n)"
            ),
            {"n": NOW},
        )
        assert c.execute(text("select max(id) from deliveries")).scalar() == 3
    with pytest.raises(SQLAlchemyError), engine.begin() as c:  # still one per reader and campaign
        c.execute(
            text(
                "insert into deliveries (campaign_id, subscriber_id, status, attempts,"
                " next_attempt_at, created_at) values (1, 1, 'queued', 0, :n, :n)"
            ),
            {"n": NOW},
        )
    with engine.begin() as c:
        c.execute(text("delete from campaigns"))  # its deliveries go with it
        assert c.execute(text("select count(*) from deliveries")).scalar() == 0
    engine.dispose()


def test_0010_keeps_sources_and_items_and_reads_each_feed_once_more(
    database_url: str, tmp_path: Path
) -> None:
    """From 0009 with a source and its ten items, to head: both kept, the source with no
    document digest, so its next document is parsed (all unchanged) and the one after is not."""
    from newsletter.clock import FrozenClock
    from newsletter.config import SourcesSettings
    from newsletter.ingest import ingest_source

    feed = tmp_path / "feed.xml"
    feed.write_bytes((Path(__file__).parents[1] / "newsletter/data/portal-feed.xml").read_bytes())
    engine = make_engine(database_url)
    _upgrade_to(engine, "0009_delivery_ids_never_reused")
    settings, clock = SourcesSettings(), FrozenClock(NOW.replace(tzinfo=UTC))
    with engine.begin() as c:
        c.execute(
            text("insert into sources (url, name, lang, etag) values (:u, 'portal', 'be', 'e')"),
            {"u": str(feed)},
        )
    with Session(engine) as session:  # the columns 0009 has, as an operator's database has them
        for item in parse_feed(
            feed.read_bytes(),
            source=str(feed),
            base_url=feed.as_uri(),
            urgent_category=settings.urgent_category,
            now=clock.now(),
        ):
            session.execute(
                text(
                    "insert into items (source_id, guid, link, title, summary_html, content_html,"
                    " published_at, categories, urgent, content_hash, ingested_at, updated_at)"
                    " values (1, :guid, :link, :title, :summary, :content, :published, '[]',"
                    " :urgent, :hash, :now, :now)"
                ),
                {
                    "guid": item.guid,
                    "link": item.link,
                    "title": item.title,
                    "summary": item.summary_html,
                    "content": item.content_html,
                    "published": item.published_at.replace(tzinfo=None),
                    "urgent": item.urgent,
                    "hash": item.content_hash,
                    "now": NOW,
                },
            )
        session.commit()
    migrate(engine)
    with engine.begin() as c:
        row = c.execute(text("select name, lang, etag, document_digest from sources")).one()
        assert tuple(row) == ("portal", "be", "e", None)
        assert c.execute(text("select count(*) from items")).scalar() == 10
    for expected in ((0, 0, False), (0, 0, True)):
        with Session(engine) as session:
            report = ingest_source(
                session=session, url_or_path=str(feed), settings=settings, clock=clock
            )
            session.commit()
        assert (report.new, report.updated, report.not_modified) == expected
    engine.dispose()


def test_the_newest_migration_file_names_alembics_head() -> None:
    """check_schema reads the head from the file that sorts last: it must be Alembic's head."""
    from alembic.script import ScriptDirectory

    from newsletter.db import head_revision

    assert head_revision() == ScriptDirectory(str(MIGRATIONS)).get_current_head()


def test_checking_the_schema_loads_no_migration_machinery(tmp_path: object) -> None:
    """Every command checks the schema at start; Alembic (and Mako, Pygments) stay unloaded."""
    from tests.test_cli import in_new_process

    url = f"sqlite:///{tmp_path}/check.db"
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    loaded = in_new_process(
        "import sys",
        "from newsletter.db import check_schema, make_engine",
        f"check_schema(make_engine({url!r}))",
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'alembic', 'mako', 'pygments'}))",
    )
    assert loaded == "[]"


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_the_schema_check_refuses_an_empty_or_older_database(database_url: str) -> None:
    from newsletter.db import check_schema
    from newsletter.errors import DatabaseError

    engine = make_engine(database_url)
    try:
        with pytest.raises(DatabaseError, match="is not initialised: run `newsletter init`"):
            check_schema(engine)
        _upgrade_to(engine, "0008_complaints")
        with pytest.raises(DatabaseError, match="is at revision 0008_complaints: run"):
            check_schema(engine)
        migrate(engine)
        check_schema(engine)
    finally:
        engine.dispose()
