"""Lists: declarations and their sync, the List-Id default, list CRUD (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.db import unit_of_work
from newsletter.db.models import Event, MailingList, Segment
from newsletter.errors import AudienceError
from newsletter.lists import (
    ListSpec,
    create_list,
    default_list_id,
    get_list,
    list_counts,
    list_overview,
    read_lists,
    sync_declarations,
)
from newsletter.subscriptions import subscribe, unsubscribe
from tests.conftest import SECRET
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]
FROM = "news@portal.example.org"  # [mail] from_address's embedded default

UNDECLARED_ID = """
[[lists]]
slug = "press"
kind = "alerts"
name = { en = "Press" }
"""


def declare(folder: Path, lists: str, segments: str | None = None) -> Path:
    """A lists.toml (and a segments.toml beside it) in a folder of its own."""
    folder.mkdir(exist_ok=True)
    path = folder / "lists.toml"
    path.write_text(lists, encoding="utf-8")
    if segments is not None:
        (folder / "segments.toml").write_text(segments, encoding="utf-8")
    return path


def cli_env(tmp_path: Path, database_url: str) -> dict[str, str]:
    (tmp_path / "config.toml").write_text(f"[database]\nurl = '{database_url}'\n")
    return {"NEWSLETTER_SECRET": SECRET}


def test_default_list_id_is_the_slug_in_the_senders_domain() -> None:
    """SLUG.<domain of [mail] from_address>, as `lists create --list-id` documents."""
    assert default_list_id("press", from_address=FROM) == "press.portal.example.org"


def test_a_declared_list_without_list_id_gets_the_documented_default(
    tmp_path: Path, database_url: str
) -> None:
    """`lists sync` and `lists create` give a list without a List-Id the same one.

    The sync used to give `SLUG.newsletter.invalid`, the command line `SLUG.<domain>`.
    """
    env = cli_env(tmp_path, database_url)
    run(["init"], tmp_path, env)
    run(["lists", "sync", str(declare(tmp_path / "decl", UNDECLARED_ID))], tmp_path, env)
    run(["lists", "create", "legal", "--kind", "digest"], tmp_path, env)
    shown = {
        slug: json.loads(run(["lists", "show", slug, "--json"], tmp_path, env).stdout)["list_id"]
        for slug in ("press", "legal")
    }
    assert shown == {"press": "press.portal.example.org", "legal": "legal.portal.example.org"}


def test_read_lists_without_a_domain_needs_every_list_id(tmp_path: Path) -> None:
    """Without [mail] from_address to derive it from, a missing list_id is one clear error."""
    path = declare(tmp_path / "decl", UNDECLARED_ID)
    with pytest.raises(AudienceError, match=r"lists\[0\] \(press\): 'list_id' is required"):
        read_lists(path)
    assert read_lists(path, from_address=FROM)[0].list_id == "press.portal.example.org"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param("[[lists]]\nkind = 'digest'\n", "'slug' is required", id="no-slug"),
        pytest.param("[[lists]]\nslug = 'x'\nkind = 'news'\n", "digest or alerts", id="bad-kind"),
        pytest.param("[[lists]\n", "cannot read list declarations", id="not-toml"),
    ],
)
def test_bad_declarations_stop_with_one_line(tmp_path: Path, text: str, problem: str) -> None:
    """A declaration that cannot be applied names the file and what is wrong."""
    path = declare(tmp_path / "decl", text)
    with pytest.raises(AudienceError, match=problem) as caught:
        read_lists(path, from_address=FROM)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_init_and_lists_sync_apply_declarations_alike(tmp_path: Path, database_url: str) -> None:
    """One sync: `init --lists F` and `lists sync F` apply lists and segments and say the same."""
    env = cli_env(tmp_path, database_url)
    first = declare(
        tmp_path / "one", UNDECLARED_ID, "[[segments]]\nname = 'be'\nrule = 'lang = \"be\"'\n"
    )
    init = run(["init", "--lists", str(first)], tmp_path, env).stdout
    assert "lists: created 1, updated 0; segments: created 1, updated 0" in init
    second = declare(
        tmp_path / "two",
        UNDECLARED_ID.replace("alerts", "digest") + UNDECLARED_ID.replace("press", "legal"),
        "[[segments]]\nname = 'ru'\nrule = 'lang = \"ru\"'\n",
    )
    synced = run(["lists", "sync", str(second)], tmp_path, env)
    assert "lists: created 1, updated 1; segments: created 1, updated 0" in synced.stdout
    assert "segment 'be' is no longer declared" in synced.stderr
    again = run(["init", "--lists", str(first)], tmp_path, env)
    assert "lists: created 0, updated 1; segments: created 0, updated 0" in again.stdout
    assert "list 'legal' is in the database but no longer declared" in again.stderr
    assert "segment 'ru' is no longer declared" in again.stderr


def test_sync_declarations_without_segments_file(
    factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """With no segments.toml beside the lists, only the lists are applied."""
    path = declare(tmp_path / "decl", UNDECLARED_ID)
    with unit_of_work(factory) as session:
        report = sync_declarations(
            session=session,
            lists_file=path,
            segments_file=path.with_name("segments.toml"),
            from_address=FROM,
        )
        assert report.lists.created == ("press",) and report.segments_created == 0
        assert session.scalar(select(Segment.id)) is None
        assert get_list(session, "press").list_id == "press.portal.example.org"


def test_create_list_refuses_a_slug_in_use_and_records_an_event(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """A new list leaves a list.created event; the same slug again is refused."""
    spec = ListSpec("legal", "digest", True, "legal.example.org", {"en": "Legal"})
    with unit_of_work(factory) as session:
        create_list(session=session, spec=spec, now=clock.now(), actor="test")
    with unit_of_work(factory) as session, pytest.raises(AudienceError, match="exists already"):
        create_list(session=session, spec=spec, now=clock.now(), actor="test")
    with unit_of_work(factory) as session:
        [event] = session.scalars(select(Event).where(Event.action == "list.created"))
        assert event.detail == {"list": "legal"}
        assert session.scalar(select(MailingList.name)) == "Legal"


def test_get_list_names_the_lists_that_exist(factory: sessionmaker[Session]) -> None:
    """An unknown slug says which lists there are, or to run init."""
    with unit_of_work(factory) as session, pytest.raises(AudienceError, match="newsletter init"):
        get_list(session, "nope")


def test_overview_and_counts_follow_subscriptions(
    factory: sessionmaker[Session], clock: FrozenClock, tmp_path: Path
) -> None:
    """`lists list` counts active subscriptions; `lists show` counts them by status."""
    with unit_of_work(factory) as session:
        sync_declarations(
            session=session,
            lists_file=ROOT / "subscribers" / "lists.toml",
            segments_file=tmp_path / "none.toml",
            from_address=FROM,
        )
        digest = get_list(session, "weekly-digest")
        digest_id = digest.id
        ids = [
            subscribe(
                session=session,
                email=f"{who}@example.org",
                lists=[digest],
                secret=SECRET,
                now=clock.now(),
                actor="test",
                confirmed=confirmed,
            ).subscriber_id
            for who, confirmed in (("a", True), ("b", True), ("c", False))
        ]
        unsubscribe(
            session=session, subscriber_id=ids[1], list_id=digest_id, now=clock.now(), actor="t"
        )
    with unit_of_work(factory) as session:
        rows = {r.slug: r.active for r in list_overview(session)}
        counts = list_counts(session, digest_id)
    assert rows == {"urgent-actions": 0, "weekly-digest": 1}
    assert counts == {"pending": 1, "active": 1, "unsubscribed": 1}
