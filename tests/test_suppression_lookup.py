"""Suppression look-ups as an import makes them: a chunk's worth of hashes in one statement (an
IN list on SQLite, one JSON array parameter on PostgreSQL), and the keyed hash computed from a
state prepared once per secret (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from newsletter.db import unit_of_work
from newsletter.db.queries import find_suppressions
from newsletter.suppression import address_hasher, hash_address, suppress, suppressed_forms
from tests.conftest import SECRET

NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_the_prepared_hasher_gives_hash_address() -> None:
    for secret in (SECRET, "", "k" * 200, "ключ"):
        hashed = address_hasher(secret)
        for email in ("ann@example.org", " Ann@Example.ORG ", "ann@bücher.example", ""):
            assert hashed(email) == hash_address(email, secret=secret)
    assert address_hasher(SECRET)("a@b.c") != address_hasher(SECRET + "2")("a@b.c")


def test_a_chunk_of_hashes_is_looked_up_at_once(factory: sessionmaker[Session]) -> None:
    gone = ["gone1@example.org", "Gone2@Example.org", "gone3@bücher.example"]
    with unit_of_work(factory) as session:
        for email in gone:
            suppress(session, email, secret=SECRET, reason="test", now=NOW)
    asked = [f"person{i}@example.org" for i in range(2500)] + gone
    hashes = [hash_address(e, secret=SECRET) for e in asked]
    with unit_of_work(factory) as session:
        assert find_suppressions(session, []) == []
        found = find_suppressions(session, hashes)
        assert sorted(found) == sorted(hash_address(e, secret=SECRET) for e in gone)
        assert find_suppressions(session, hashes[:10]) == []
        # Hashes are hex, but the parameter is JSON: a value that would need quoting is a value.
        assert find_suppressions(session, ['"', "\\", "x'); --", "ä"]) == []
        assert suppressed_forms(session, asked, secret=SECRET) == set(gone)
